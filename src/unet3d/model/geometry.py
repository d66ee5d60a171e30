"""Input/output sizes of a U-Net: what tiling, patch sampling and the CLI all need to agree on.

Sizes are per axis in (Z, Y, X) order. With valid padding every 3×3×3 convolution removes one
voxel per side, so the output is smaller than the input by a constant margin (44 per side for the
paper's 4-level net) and only some input sizes keep every pooled feature map even.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Geometry:
    levels: int
    padding: str = "valid"
    dims: int = 3

    def _axis_is_convolved(self, axis: int) -> bool:
        return self.dims == 3 or axis != 0

    def output_size_1d(self, n: int, axis: int = 1) -> int | None:
        """Output length for input length n along one axis, or None if n is not a valid size."""
        if not self._axis_is_convolved(axis):
            return n if n >= 1 else None
        step = 2 ** (self.levels - 1)
        if self.padding == "same":
            return n if n >= step and n % step == 0 else None
        for _ in range(self.levels - 1):
            n -= 4
            if n < 2 or n % 2:
                return None
            n //= 2
        n -= 4
        if n < 1:
            return None
        for _ in range(self.levels - 1):
            n = 2 * n - 4
            if n < 1:
                return None
        return n

    def output_shape(self, shape) -> tuple[int, ...]:
        """Output shape for an input shape; ValueError naming the nearest valid sizes otherwise."""
        out = []
        for axis, n in enumerate(shape):
            m = self.output_size_1d(n, axis)
            if m is None:
                raise ValueError(
                    f"input size {n} along axis {axis} is not valid for this network; "
                    f"nearest valid sizes: {self.valid_input_size_1d(n, axis, 'down')} or "
                    f"{self.valid_input_size_1d(n, axis, 'up')}"
                )
            out.append(m)
        return tuple(out)

    def valid_input_size_1d(self, n: int, axis: int = 1, direction: str = "up") -> int | None:
        """Nearest valid input length ≥ n ('up') or ≤ n ('down'; None if there is none)."""
        step = 1 if direction == "up" else -1
        candidate = max(n, 1)
        while candidate >= 1:
            if self.output_size_1d(candidate, axis) is not None:
                return candidate
            candidate += step
        return None

    def valid_input_shape(self, shape, direction: str = "up") -> tuple[int, ...]:
        return tuple(self.valid_input_size_1d(n, a, direction) for a, n in enumerate(shape))

    def input_shape_for_output(self, out_shape) -> tuple[int, ...]:
        """Smallest valid input whose output covers at least out_shape."""
        shape = []
        for axis, m in enumerate(out_shape):
            n = self.valid_input_size_1d(m + 2 * self.margin_1d(axis), axis, "up")
            shape.append(n)
        return tuple(shape)

    def margin_1d(self, axis: int = 1) -> int:
        """Context lost per side along an axis (0 for same padding and the 2D net's z axis)."""
        if self.padding == "same" or not self._axis_is_convolved(axis):
            return 0
        n = self.valid_input_size_1d(1, axis, "up")
        return (n - self.output_size_1d(n, axis)) // 2

    def margin(self) -> tuple[int, int, int]:
        return tuple(self.margin_1d(axis) for axis in range(3))

    def reach_1d(self, axis: int = 1) -> int:
        """How far, per side, an output voxel of this architecture depends on its input: the
        valid-padding margin plus the pooling cells' extent (a voxel's cell at the deepest level
        spans 2^(levels-1) voxels around it), rounded up to the pooling grid. With this much real
        context, a same-padding network's output equals its whole-volume output."""
        if not self._axis_is_convolved(axis):
            return 0
        step = 2 ** (self.levels - 1)
        valid = Geometry(self.levels, "valid", self.dims).margin_1d(axis)
        return -(-(valid + step - 1) // step) * step

    def reach(self) -> tuple[int, int, int]:
        return tuple(self.reach_1d(axis) for axis in range(3))
