"""GrowingLayer: appends in place, never disturbs earlier views, matches DynamicLayer."""

from __future__ import annotations

import torch

from kvfactory.engines.hf.growing_cache import MIN_SPARE_TOKENS, GrowingLayer, room_for


def _states(tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    shape = (1, 2, tokens, 4)
    return torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)


def test_appends_match_concatenation_and_earlier_views_stay_unchanged() -> None:
    from transformers.cache_utils import DynamicLayer

    growing, dynamic = GrowingLayer(), DynamicLayer()
    views: list[tuple[torch.Tensor, torch.Tensor]] = []
    for step, tokens in enumerate([300, 1, 1, 200, 64, 1]):
        keys, values = _states(tokens, seed=step)
        got = growing.update(keys, values)
        want = dynamic.update(keys, values)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        views.append((got[0], got[1].clone()))
        assert growing.get_seq_length() == dynamic.get_seq_length()
    # the first view was taken at 300 tokens; later appends and a regrowth left it alone
    first_keys, first_values_copy = views[0]
    assert first_keys.shape[-2] == 300
    assert torch.equal(first_keys, dynamic.keys[:, :, :300])
    assert torch.equal(views[-1][1], dynamic.values)
    assert torch.equal(first_values_copy, dynamic.values[:, :, :300])


def test_a_decode_step_writes_into_spare_room_without_reallocating() -> None:
    layer = GrowingLayer()
    layer.update(*_states(1000, seed=1))
    buffer = layer._key_buffer
    assert buffer is not None and buffer.shape[-2] == room_for(1000) == 1000 + MIN_SPARE_TOKENS
    for step in range(room_for(1000) - 1000):
        layer.update(*_states(1, seed=2 + step))
        assert layer._key_buffer is buffer  # same storage: no copy of the context
    layer.update(*_states(1, seed=9999))
    assert layer._key_buffer is not buffer and layer.get_seq_length() == room_for(1000) + 1
    assert room_for(4000) == 5000


def test_adopted_buffers_are_used_in_place() -> None:
    keys, values = torch.zeros(1, 2, 400, 4), torch.zeros(1, 2, 400, 4)
    keys[:, :, :256] = 1.0
    layer = GrowingLayer()
    layer.adopt(keys, values, 256)
    assert layer.get_seq_length() == 256
    new_keys, new_values = _states(3, seed=5)
    out_keys, _ = layer.update(new_keys, new_values)
    assert out_keys.data_ptr() == keys.data_ptr()
    assert torch.equal(keys[:, :, 256:259], new_keys)
    assert torch.equal(out_keys[:, :, :256], torch.ones(1, 2, 256, 4))
