"""The 3D U-Net paper's experiments re-run on public volumes with dense ground truth."""
