import os

# Two cores on CI: keep torch from oversubscribing them.
os.environ.setdefault("OMP_NUM_THREADS", "2")

import pytest  # noqa: E402


@pytest.fixture
def sdpa_masks(monkeypatch):
    """Each mask transformers' sdpa mask function returns (None: left out), with whether the current
    CUDA stream was capturing then: [(capturing, mask), ...]."""
    import torch
    import transformers.masking_utils as masking

    seen = []
    original = masking.ALL_MASK_ATTENTION_FUNCTIONS._global_mapping["sdpa"]

    def spy(*args, **kwargs):
        mask = original(*args, **kwargs)
        seen.append((torch.cuda.is_available() and torch.cuda.is_current_stream_capturing(), mask))
        return mask

    monkeypatch.setitem(masking.ALL_MASK_ATTENTION_FUNCTIONS._global_mapping, "sdpa", spy)
    return seen
