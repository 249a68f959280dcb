"""Loss and MTP loss on packed documents vs a hand computation (float64 NumPy, explicit loops).

The reference never sees the packing: each document runs through the model alone (padded on the
right, which a causal model ignores), and the cross-entropies are summed target by target.
"""

from __future__ import annotations

import numpy as np
import pytest
from flax import nnx

from qwenjax.train.loss import loss_fn
from tests.train.packing import SMALL, documents, packed_batch, random_model

T, MTP_WEIGHT = 40, 0.3


def nll(logits: np.ndarray, target: int) -> float:
    logits = np.asarray(logits, np.float64)
    top = logits.max()
    return float(top + np.log(np.exp(logits - top).sum()) - logits[target])


def logits_of_documents(model, batch):
    """Main and MTP logits of every document run on its own (no segment ids)."""
    docs = documents(batch)
    width = max(end - start for _, start, end in docs)
    ids = np.zeros((len(docs), width), np.int32)
    for i, (row, start, end) in enumerate(docs):
        ids[i, : end - start] = batch["input_ids"][row, start:end]

    @nnx.jit
    def run(model, ids):
        hidden = model.hidden(ids)
        mtp = model.mtp_hidden(hidden[:, :-1], ids[:, 1:])  # index i: h_i with x_{i+1}
        return model.logits(hidden), model.logits(mtp)

    return docs, *map(np.asarray, run(model, ids))


def hand_loss(model, batch) -> dict[str, float]:
    docs, logits, mtp_logits = logits_of_documents(model, batch)
    ce, n_ce, mtp, n_mtp = 0.0, 0, 0.0, 0
    for i, (row, start, end) in enumerate(docs):
        ids, mask = batch["input_ids"][row, start:end], batch["loss_mask"][row, start:end]
        for t in range(1, end - start):  # logits at t−1 predict token t
            if mask[t]:
                ce, n_ce = ce + nll(logits[i, t - 1], ids[t]), n_ce + 1
        for j in range(end - start - 2):  # MTP at j predicts token j+2
            if mask[j + 2]:
                mtp, n_mtp = mtp + nll(mtp_logits[i, j], ids[j + 2]), n_mtp + 1
    return dict(ce_loss=ce / n_ce, mtp_loss=mtp / n_mtp, tokens=n_ce, mtp_tokens=n_mtp)


@pytest.fixture(scope="module")
def model():
    return random_model(SMALL, seed=1)


@pytest.fixture(scope="module")
def batch():
    return packed_batch(seed=0, rows=2, seq_len=T, vocab=SMALL.vocab_size)


@pytest.fixture(scope="module")
def want(model, batch):
    return hand_loss(model, batch)


def test_loss_and_mtp_loss_match_hand_computation_on_packed_documents(model, batch, want):
    loss, metrics = nnx.jit(
        lambda m, b: loss_fn(m, b, mtp_weight=MTP_WEIGHT, ce_chunk=16)  # 40 = 2.5 chunks
    )(model, batch)
    assert metrics["tokens"] == want["tokens"] and metrics["mtp_tokens"] == want["mtp_tokens"]
    for name in ("ce_loss", "mtp_loss"):
        assert abs(float(metrics[name]) - want[name]) / want[name] < 1e-5, name
    total = want["ce_loss"] + MTP_WEIGHT * want["mtp_loss"]
    assert abs(float(loss) - total) / total < 1e-5
    assert float(metrics["loss"]) == float(loss)


def test_zero_mtp_weight_skips_the_head(model, batch, want):
    loss, metrics = nnx.jit(lambda m, b: loss_fn(m, b, mtp_weight=0.0))(model, batch)
    assert abs(float(loss) - want["ce_loss"]) / want["ce_loss"] < 1e-5
    assert float(metrics["mtp_loss"]) == 0.0 and int(metrics["mtp_tokens"]) == 0
