"""PositionDropout: the mask of a gathered row is the mask its position gets in the whole grid, and
every call consumes the same amount of the random stream whatever was gathered."""

import torch

from resnet_bk.layers.dropout import PositionDropout, consume_dropout


def test_gathered_rows_get_the_mask_of_their_position():
    drop = PositionDropout(0.5).train()
    x = torch.randn(3, 7, 4)
    torch.manual_seed(0)
    full = drop(x).reshape(21, 4)
    index = torch.tensor([2, 5, 6, 17])
    torch.manual_seed(0)
    rows = drop(x.reshape(21, 4)[index], (index, 21))
    torch.testing.assert_close(rows, full[index], rtol=0, atol=0)
    assert (full == 0).any() and (full != 0).any()
    after_full = torch.rand(())  # the stream after a gathered call continues as after a full one
    torch.manual_seed(0)
    drop(x.reshape(21, 4)[index[:1]], (index[:1], 21))
    assert torch.rand(()) == after_full
    torch.manual_seed(0)
    consume_dropout(drop, 21, 4, x)
    assert torch.rand(()) == after_full


def test_eval_and_zero_p_are_the_identity():
    x = torch.randn(2, 5, 3)
    assert PositionDropout(0.5).eval()(x) is x
    assert PositionDropout(0.0).train()(x) is x
    assert (PositionDropout(1.0).train()(x) == 0).all()
