"""Graphs a server keeps from forward to backward: bounded, checked against the backward's inputs."""

import torch

from petals_cli.server.graphs import KeptGraphs


def _graph(value: float):
    leaf = torch.full((1, 2, 3), value, requires_grad=True)
    return [leaf], leaf * 2


def test_a_kept_graph_serves_one_backward_of_exactly_the_same_computation():
    graphs = KeptGraphs()
    inputs, outputs = _graph(1.0)
    graphs.keep("a", (0, 2, ""), inputs, outputs)
    assert graphs.take("a", (0, 3, ""), [inputs[0].detach()]) is None  # other blocks
    graphs.keep("a", (0, 2, ""), inputs, outputs)
    assert graphs.take("a", (0, 2, ""), [torch.zeros(1, 2, 3)]) is None  # other inputs
    graphs.keep("a", (0, 2, ""), inputs, outputs)
    kept = graphs.take("a", (0, 2, ""), [inputs[0].detach().clone()])
    assert kept is not None and kept.outputs is outputs
    assert graphs.take("a", (0, 2, ""), [inputs[0].detach()]) is None and len(graphs) == 0  # used up
    assert graphs.take("", (0, 2, ""), [inputs[0].detach()]) is None


def test_kept_graphs_are_bounded_in_number_and_age():
    now = [0.0]
    graphs = KeptGraphs(max_graphs=2, seconds=10.0, clock=lambda: now[0])
    for name in "abc":
        graphs.keep(name, (0, 1, ""), *_graph(1.0))
    assert len(graphs) == 2
    assert graphs.take("a", (0, 1, ""), [torch.ones(1, 2, 3)]) is None  # the oldest went first
    now[0] = 11.0
    assert graphs.take("b", (0, 1, ""), [torch.ones(1, 2, 3)]) is None  # expired
    graphs.keep("d", (0, 1, ""), *_graph(1.0))
    assert len(graphs) == 1  # "c" expired and was dropped


def test_kept_graphs_are_bounded_in_bytes():
    graphs = KeptGraphs(max_graphs=8, max_bytes=1000)
    graphs.keep("a", (0, 1, ""), *_graph(1.0), nbytes=400)
    graphs.keep("b", (0, 1, ""), *_graph(1.0), nbytes=400)
    graphs.keep("c", (0, 1, ""), *_graph(1.0), nbytes=400)  # 1200 > 1000: the oldest goes
    assert len(graphs) == 2 and graphs.nbytes == 800
    assert graphs.take("a", (0, 1, ""), [torch.ones(1, 2, 3)]) is None
    graphs.keep("huge", (0, 1, ""), *_graph(1.0), nbytes=5000)  # larger than the allowance: never kept
    assert len(graphs) == 2 and graphs.take("huge", (0, 1, ""), [torch.ones(1, 2, 3)]) is None


def test_saved_bytes_counts_activations_but_not_weights():
    from petals_cli.server.graphs import SavedBytes

    linear = torch.nn.Linear(64, 64)
    hidden = torch.randn(4, 10, 64, requires_grad=True)
    with SavedBytes(exclude=list(linear.parameters())) as saved:
        output = torch.nn.functional.gelu(linear(hidden)) * 2
    assert output.requires_grad
    weight_bytes = sum(p.numel() * p.element_size() for p in linear.parameters())
    activation_bytes = hidden.numel() * hidden.element_size()
    assert activation_bytes <= saved.nbytes < activation_bytes * 3 + weight_bytes // 2
