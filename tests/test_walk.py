"""The walk over the decoder layers (calibration/walk.py): what a processor sees at each layer, against the model's
own forward; the outputs a processor passes on; residency of a layer-wise model; the backward walk's order."""
import pytest
import torch

from svdllm import load_model
from svdllm.calibration import LayerProcessor, Walk, walk_backward
from svdllm.errors import SvdllmError
from tiny import tiny_model


class Recording(LayerProcessor):
    def __init__(self):
        self.seen, self.started = [], False

    def start(self, walk):
        self.started = walk.hidden is not None

    def layer(self, step):
        self.seen.append((step.i, torch.cat([h.clone() for h in step.inputs])))
        return None

    def finish(self, walk):
        return torch.cat(walk.hidden)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_each_layer_sees_what_the_models_own_forward_gives_it(family):
    model = tiny_model(family)
    windows = torch.randint(0, 200, (3, 24))
    processor = Recording()
    last = Walk(model, windows, batch_size=2, progress=False).run(processor)
    with torch.no_grad():
        hidden = model(input_ids=windows, output_hidden_states=True).hidden_states
    layers = len(model.model.layers)
    assert processor.started and [i for i, _ in processor.seen] == list(range(layers))
    for i, inputs in processor.seen:  # hidden_states[i]: the input of layer i (the last entry is after the norm)
        torch.testing.assert_close(inputs, hidden[i], rtol=1e-5, atol=1e-5)
    assert last.shape == hidden[-1].shape


def test_the_outputs_a_processor_passes_on_feed_the_next_layer():
    model = tiny_model("llama")
    windows = torch.randint(0, 200, (2, 16))

    class Zeroing(Recording):
        def layer(self, step):
            super().layer(step)
            return [torch.zeros_like(h) for h in step.inputs] if step.i == 0 else None

    processor = Zeroing()
    Walk(model, windows, progress=False).run(processor)
    assert processor.seen[1][1].abs().max() == 0  # layer 1 received what layer 0's processor handed on


def test_a_non_finite_output_is_named_where_it_arises():
    model = tiny_model("llama")

    class Poisoning(LayerProcessor):
        def layer(self, step):
            return [torch.full_like(h, float("nan")) for h in step.inputs] if step.i == 0 else None

    with pytest.raises(SvdllmError, match="Non-finite activations.*output of model.layers.0"):
        Walk(model, torch.randint(0, 200, (2, 16)), progress=False).run(Poisoning())


def test_a_layerwise_model_has_only_the_current_layer_resident(tok, tmp_path):
    tiny_model("qwen3").save_pretrained(tmp_path / "dense")
    tok.save_pretrained(tmp_path / "dense")
    lazy, _ = load_model(str(tmp_path / "dense"), layerwise=True)
    layers = lazy.model.layers
    resident = []

    class Checking(LayerProcessor):
        def layer(self, step):
            resident.append([not any(p.is_meta for p in layer.parameters()) for layer in layers])

    Walk(lazy, torch.randint(0, 200, (2, 16)), progress=False).run(Checking())
    assert resident == [[j == i for j in range(len(layers))] for i in range(len(layers))]
    assert all(p.is_meta for layer in layers for p in layer.parameters())  # all released again
    order = []
    walk_backward(lazy, len(layers), lambda i, layer: order.append((i, not any(p.is_meta for p in layer.parameters()))),
                  progress=False)
    assert order == [(i, True) for i in reversed(range(len(layers)))]


def test_a_walk_without_windows_visits_every_layer_and_runs_none():
    model = tiny_model("mistral")
    visited = []

    class Visiting(LayerProcessor):
        def layer(self, step):
            assert step.inputs is None and step.kwargs is None
            visited.append(step.i)

    Walk(model, progress=False).run(Visiting())
    assert visited == list(range(len(model.model.layers)))
