"""`python -m unet3d`: the command line, also as torchrun starts it (`torchrun ... -m unet3d train ...`)."""

import sys

from unet3d.cli.main import main

sys.exit(main())
