"""napari plugin: the interactive loop as a dock widget, readers and writers, sample data (extra: unet3d[napari])."""
