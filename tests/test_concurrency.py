"""Several sessions analysing one shared (cached) model at once get the same results as one at a time."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from analyzers import explain, load_dataset, load_model, predict


def _snapshot(module):
    return ({k: v.clone() for k, v in module.state_dict().items()}, [m.training for m in module.modules()],
            [p.grad for p in module.parameters()])


def test_threads_sharing_one_model_match_sequential_results():
    model = load_model("sample:digits")
    x = load_dataset("sample:digits").x[:48]
    jobs = [("predict", {}), ("saliency", {}), ("gradcam", {"layer": "conv2"}),
            ("integrated_gradients", {"n_steps": 16})] * 3

    def work(job):
        method, options = job
        if method == "predict":
            return predict(model, x, batch_size=16).probs
        return explain(model, x, None, method, batch_size=16, **options)

    state, modes, grads = _snapshot(model.module)
    sequential = [work(job) for job in jobs]
    with ThreadPoolExecutor(max_workers=6) as pool:
        concurrent = list(pool.map(work, jobs))
    for one, many in zip(sequential, concurrent):
        np.testing.assert_allclose(one, many, rtol=1e-5, atol=1e-7)
    after_state, after_modes, after_grads = _snapshot(model.module)
    assert after_modes == modes and after_grads == grads
    for key, value in state.items():
        assert torch.equal(value, after_state[key])
