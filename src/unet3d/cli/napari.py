"""`unet3d napari`: open napari with the interactive 3D U-Net widget docked."""

from __future__ import annotations

from unet3d.errors import UserError


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "napari",
        help="paint a few slices in napari, train interactively, correct (needs the napari extra)",
        description="Open napari with IMAGE (default: the built-in nuclei example with 3+3+2 painted slices) "
        "and LABELS (default: an empty Labels layer to paint on; 0 = unpainted, 1, 2, ... = classes) and "
        "the unet3d widget docked: Train trains a 3D U-Net on the painted voxels in the background and "
        "shows its prediction as it learns; paint where it is wrong and Train again (it continues from "
        "the current weights). Needs `pip install 'unet3d[napari]'` and a display.",
    )
    parser.add_argument("image", nargs="?", help="image volume (any format unet3d reads)")
    parser.add_argument("labels", nargs="?", help="a painting to continue (0 = unpainted)")
    parser.set_defaults(run=run)


def run(args) -> int:
    try:
        import napari
    except ImportError:
        raise UserError("the napari plugin needs napari: pip install 'unet3d[napari]'") from None
    import numpy as np

    from unet3d.io import read_image, read_labels
    from unet3d.napari.io import nuclei_sample
    from unet3d.napari.widget import InteractiveWidget

    viewer = napari.Viewer(title="unet3d")
    if args.image is None:
        for data, kwargs, kind in nuclei_sample():
            getattr(viewer, f"add_{kind}")(data, **kwargs)
    else:
        image, meta = read_image(args.image)
        scale = tuple(meta.spacing) if meta.spacing else None
        viewer.add_image(image[0] if image.shape[0] == 1 else image, name="image", scale=scale)
        painting = read_labels(args.labels)[0] if args.labels else np.zeros(image.shape[1:], np.uint8)
        viewer.add_labels(painting, name="painting", scale=scale)
    widget = InteractiveWidget(viewer)
    viewer.window.add_dock_widget(widget, name="unet3d", area="right")
    widget.reset_choices()
    widget.image.value = viewer.layers[0]
    widget.painting.value = viewer.layers[-1]
    viewer.layers.selection.active = viewer.layers[-1]
    napari.run()
    return 0
