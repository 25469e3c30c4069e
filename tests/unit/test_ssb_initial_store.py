"""ssb.initial_store: a GRPO trainer starts with a prompt-pool store's groups in its buffer."""

from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from megatron_r1v.config import RunConfig, SSBConfig
from megatron_r1v.ssb import SelectiveSampleBuffer, SSBGroup, StoreOrigin, load_initial, plan_batch, save
from megatron_r1v.trainer.grpo import GRPOTrainer


class _Tokenizer:
    def __init__(self, n):
        self.vocab = {f"t{i}": i for i in range(n)}

    def get_vocab(self):
        return dict(self.vocab)

    def __len__(self):
        return len(self.vocab)


def _template(vocab=64):
    return SimpleNamespace(tokenizer=_Tokenizer(vocab), format=SimpleNamespace(source="qwq"),
                           config=SimpleNamespace(tokens_per_tile=4))


def _group(i, totals, step=0):
    g = len(totals)
    t = torch.tensor([totals], dtype=torch.float64)
    adv = ((t - t.mean()) / (t.std() + 1e-6))[0].numpy() if len(set(totals)) > 1 else np.zeros(g)
    return SSBGroup(prompt_id=f"p{i}", step=step, token_ids=[np.arange(5 + k) + i for k in range(g)],
                    loss_mask=[np.ones(2, bool)] * g, old_logprobs=[np.full(2, -0.5)] * g, advantages=adv,
                    rewards={"total": np.array(totals, dtype=np.float64)})


ORIGIN = StoreOrigin.of(_template(), max_tiles=2, n_samples=3, temperature=1.0)
# Reward stds 1.0, 0.1, 1.0, 0.0577 (all effective at min_reward_std 0).
TOTALS = [[1.0, 0.0, -1.0], [0.0, 0.1, 0.2], [2.0, 0.0, 1.0], [0.0, 0.0, 0.1]]


def _store(path, groups=None, origin=ORIGIN):
    buffer = SelectiveSampleBuffer(SSBConfig(capacity=100, min_reward_std=0.0))
    buffer.insert(groups if groups is not None else [_group(i, t) for i, t in enumerate(TOTALS)])
    save(buffer, path, step=0, origin=origin)
    return path


def _trainer(store, min_reward_std=0.0, dp=(0, 1), prompts=4, **ssb):
    cfg = RunConfig()
    cfg.rollout.n_samples, cfg.rollout.temperature, cfg.data.max_tiles = 3, 1.0, 2
    cfg.ssb = SSBConfig(initial_store=str(store), min_reward_std=min_reward_std, **ssb)
    ids = {f"p{i}" for i in range(prompts)}

    def record(prompt_id):
        if prompt_id not in ids:
            raise KeyError(f"prompt {prompt_id!r} is not in this run's data ({len(ids)} records)")
        return prompt_id

    loader = SimpleNamespace(template=_template(), record=record)
    ctx = SimpleNamespace(rank=0, dp_rank=dp[0], dp=dp[1], dp_group=None, tp=1, cp=1, device=torch.device("cpu"))
    return GRPOTrainer(cfg, ctx, None, None, None, loader, None, SelectiveSampleBuffer(cfg.ssb), None, None)


def test_initial_store_fills_the_buffer_and_ages_out_as_step_0(tmp_path, capsys):
    store = _store(tmp_path / "store")
    trainer = _trainer(store)
    assert len(trainer.buffer) == 4 and {g.step for g in trainer.buffer.groups} == {0}
    assert f"SSB: loaded 4 groups from ssb.initial_store {store} over 1 DP rank(s) (0 not admitted" \
        in capsys.readouterr().out
    # This run's stricter criterion drops the groups below it, as for a resumed buffer.
    assert len(_trainer(store, min_reward_std=0.5).buffer) == 2
    # Step-0 groups: kept through step max_age, gone after it (plan_batch ages out first).
    fresh = [np.zeros(3)]
    assert plan_batch(trainer.buffer, fresh, step=8).stats.aged_out == 0 and len(trainer.buffer) == 4
    assert plan_batch(trainer.buffer, fresh, step=9).stats.aged_out == 4 and len(trainer.buffer) == 0


def test_initial_store_is_split_over_dp_ranks(tmp_path):
    store = _store(tmp_path / "store")
    shares = [load_initial(store, r, 2, SSBConfig(), ORIGIN) for r in range(2)]
    uids = sorted(g.uid for g in shares[0] + shares[1])
    assert [len(s) for s in shares] == [2, 2] and uids == sorted(g.uid for g in load_initial(store, 0, 1,
                                                                                               SSBConfig(), ORIGIN))
    assert len(_trainer(store, capacity=1).buffer) == 1  # one process: its buffer is the whole capacity
    # Over 2 DP ranks the capacity counts both: tests/distributed/test_ssb_dp.py (sharded eviction).


@pytest.mark.parametrize("origin, message", [
    (replace(ORIGIN, n_samples=4), "field origin.n_samples is 4, this run has 3 (rollout.n_samples)"),
    (replace(ORIGIN, temperature=0.7), "field origin.temperature is 0.7, this run has 1.0 (rollout.temperature)"),
    (StoreOrigin.of(_template(65), 2, 3, 1.0), "field origin.tokenizer is "),
    (None, "field origin is missing: not written by `python -m megatron_r1v.ssb.prompt_pool --ssb-store`"),
])
def test_a_store_that_does_not_fit_the_run_is_an_error(tmp_path, origin, message):
    store = _store(tmp_path / "store", origin=origin)
    with pytest.raises(ValueError, match=f"ssb.initial_store {store}: ") as err:
        _trainer(store)
    assert message in str(err.value)


def test_initial_store_group_errors(tmp_path):
    store = _store(tmp_path / "old", [_group(0, [1.0, 0.0, 2.0], step=5)])
    with pytest.raises(ValueError, match="group of prompt 'p0': field step is 5"):
        _trainer(store)
    with pytest.raises(ValueError, match="field prompt_id: prompt 'p3' is not in this run's data"):
        _trainer(_store(tmp_path / "store"), prompts=3)
    with pytest.raises(FileNotFoundError, match="SSB store .*missing does not exist"):
        _trainer(tmp_path / "missing")
    with pytest.raises(ValueError, match="ssb.initial_store needs ssb.enabled true"):
        _trainer(store, enabled=False)
