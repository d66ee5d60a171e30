"""End-to-end jobs built from the parts: densify a sparsely annotated volume."""
