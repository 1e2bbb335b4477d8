import numpy as np
import torch

from hpc_mto.blocks import BlockLayout, select_names


def _net():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 2))
    opt = torch.optim.Adam(net.parameters())
    net(torch.randn(5, 4)).sum().backward()
    opt.step()
    return net, opt


def test_default_pattern_selects_float_params_and_buffers_but_not_step_counters():
    net, _ = _net()
    names = select_names(net.state_dict(), ["*"])
    assert "1.running_mean" in names and "1.running_var" in names
    assert "1.num_batches_tracked" not in names
    assert select_names(net.state_dict(), ["0.*"]) == ["0.weight", "0.bias"]


def test_pack_unpack_round_trip_moves_exactly_the_selected_entries():
    net, opt = _net()
    layout = BlockLayout(net, opt, ["0.*"], with_optimizer_state=True)
    buf = layout.pack()
    assert layout.size == 3 * (12 + 3) + 2  # params, exp_avg, exp_avg_sq, and a step per param
    before = {k: v.clone() for k, v in net.state_dict().items()}
    layout.unpack(np.zeros_like(buf))
    after = net.state_dict()
    assert torch.count_nonzero(after["0.weight"]) == 0
    for k in before:
        if not k.startswith("0."):
            assert torch.equal(before[k], after[k]), k
    assert all(torch.count_nonzero(v) == 0 for k, v in opt.state[net[0].weight].items())
    layout.unpack(buf)
    assert torch.equal(net.state_dict()["0.weight"], before["0.weight"])
