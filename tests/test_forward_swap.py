"""diffrt.export.forward_swap: modules' forwards replaced inside, restored after."""

from __future__ import annotations

import pytest
import torch

from diffrt.export.forward_swap import swapped_forwards


def test_forwards_are_swapped_inside_and_restored_even_on_error():
    double, scaled = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    model = torch.nn.Sequential(double, scaled)
    own = lambda x: x * 3.0  # noqa: E731  an instance forward set before the swap must come back
    scaled.forward = own
    x = torch.ones(1, 2)
    with swapped_forwards([(double, lambda x: x * 2.0), (scaled, lambda x: x + 1.0)]):
        assert torch.equal(model(x), torch.full((1, 2), 3.0))
    assert "forward" not in double.__dict__ and scaled.forward is own
    assert torch.equal(model(x), double(x) * 3.0)
    with pytest.raises(RuntimeError, match="inside"), swapped_forwards([(double, lambda x: x)]):
        raise RuntimeError("inside")
    assert "forward" not in double.__dict__
