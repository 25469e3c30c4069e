"""OneStepOffRollout (rollout.mode async): draws, the staleness bound, a failed step's restore,
and the rollout in flight through a checkpoint at another DP size. The loader is the real
PromptLoader on synthetic prompts; the engine process is replaced by a recorder of its split
generate calls (the process itself: test_engine_process.py; the whole trainer:
tests/e2e/test_grpo_train.py::test_async_rollout_overlaps_and_resumes_exactly)."""

from types import SimpleNamespace

import pytest
import torch

from megatron_r1v.data.loader import PromptLoader
from megatron_r1v.data.schema import load_records
from megatron_r1v.data.synthetic import generate_dataset
from megatron_r1v.data.template import ChatTemplate, TemplateConfig
from megatron_r1v.data.tiling import PILTiler, TilingConfig
from megatron_r1v.data.tokenizer import build_tokenizer
from megatron_r1v.rollout.engine import RolloutSample, SamplingParams
from megatron_r1v.rollout.engine_process import EngineProcessError, GenerationResult
from megatron_r1v.trainer.grpo_async import MAX_STALENESS, OneStepOffRollout

PROMPTS = 4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("async")
    generate_dataset(root / "data", 10, seed=5)
    build_tokenizer([root / "data" / "prompts.jsonl"], 600, root / "tok")
    template = ChatTemplate(AutoTokenizer.from_pretrained(str(root / "tok")), TemplateConfig(tokens_per_tile=4))
    return load_records(root / "data" / "prompts.jsonl", "prompts").records, template


class RecordingEngine:
    """start_generate / finish_generate as EngineProcess has them; each sample's ids encode its
    prompt and index, so a test can tell whose responses it got."""

    def __init__(self, fail: bool = False) -> None:
        self.fail, self.started, self.generating, self._requests = fail, [], False, []

    def start_generate(self, requests, params: SamplingParams) -> None:
        assert not self.generating, "one generation at a time"
        self.started.append(([r.prompt_id for r in requests], params.seed))
        self.generating, self._requests = True, list(requests)

    def finish_generate(self) -> GenerationResult:
        self.generating = False
        if self.fail:
            raise EngineProcessError("rollout engine process (pid 1): generate: RuntimeError: boom")
        return GenerationResult([[RolloutSample(r.prompt_id, torch.tensor([len(r.prompt_ids), k]),
                                                torch.tensor([-0.5, -float(k)]), True, f"{r.prompt_id}/{k}")
                                  for k in range(2)] for r in self._requests], 0.25, 0.05)


def make(setup, dp=1, dp_rank=0, engine=None):
    records, template = setup
    loader = PromptLoader(records, template, PILTiler(TilingConfig(image_size=56, max_tiles=2)), seed=7,
                          dp_rank=dp_rank, dp_size=dp)
    ctx = SimpleNamespace(dp=dp, dp_rank=dp_rank, cp_rank=0, rank=dp_rank)
    return OneStepOffRollout(ctx, loader, engine, PROMPTS, lambda step: SamplingParams(n=2, seed=100 + step))


def test_draw_take_and_the_staleness_bound(setup):
    engine = RecordingEngine()
    rollout = make(setup, engine=engine)
    reference = make(setup).loader.next_batch(PROMPTS)
    assert rollout.draw(0, version=0) is None
    assert engine.generating and engine.started[0] == ([i.record.id for i in reference], 100)
    taken = rollout.take(0, version=0)
    assert not engine.generating and [g[0].prompt_id for g in taken.samples] == engine.started[0][0]
    assert taken.positions == [0, 1, 2, 3] and taken.overlap_seconds == pytest.approx(0.2)
    rollout.draw(1, version=0)  # from W_0 while step 0 trains
    assert rollout.take(1, version=1).version == 0  # one step stale: allowed
    rollout.draw(2, version=0)  # a bug that skipped a weight sync: two steps stale
    with pytest.raises(RuntimeError, match=f"version 2 on responses sampled at version 0; the bound is "
                                           f"{MAX_STALENESS} step"):
        rollout.take(2, version=2)
    with pytest.raises(RuntimeError, match="step 4 has no rollout in flight"):
        rollout.take(3, version=3)


def test_a_failed_step_puts_its_rollout_back_and_drops_the_new_one(setup):
    engine = RecordingEngine()
    rollout = make(setup, engine=engine)
    rollout.draw(0, version=0)
    snapshot = rollout.snapshot()  # the step begins
    taken = rollout.take(0, version=0)
    cursor = dict(rollout.loader.state_dict())
    rollout.draw(1, version=0)
    assert engine.generating and rollout.loader.state_dict() != cursor
    rollout.restore(snapshot)  # the step failed after starting step 1's generation
    assert not engine.generating and rollout.pending is taken and taken.samples is not None


def test_the_rollout_in_flight_survives_a_checkpoint_at_another_dp(setup, tmp_path):
    """Two DP replicas save their shares (settling the generation first); a run at DP=1 gets
    the whole batch in the loader's order with each prompt's own samples, one at DP=4 its
    position; the samples are not generated again."""
    replicas = [make(setup, dp=2, dp_rank=r, engine=RecordingEngine()) for r in range(2)]
    for rollout in replicas:
        rollout.draw(5, version=4)
        rollout.save(tmp_path)
        assert not rollout.engine.generating
    files = sorted(p.name for p in (tmp_path / "pending_rollout").iterdir())
    assert files == ["dp_00000.pt", "dp_00001.pt"]
    whole_engine = RecordingEngine()
    whole = make(setup, engine=whole_engine)
    whole.load(tmp_path)
    order = [i.record.id for i in make(setup).loader.next_batch(PROMPTS)]
    taken = whole.take(5, version=5)
    assert [i.record.id for i in taken.items] == order and taken.positions == [0, 1, 2, 3]
    assert [group[1].text for group in taken.samples] == [f"{rid}/1" for rid in order]
    assert whole_engine.started == [] and taken.version == 4
    quarter = make(setup, dp=4, dp_rank=3)  # a rank that holds no engine gets the prompts only
    quarter.load(tmp_path)
    assert [i.record.id for i in quarter.pending.items] == order[3:] and quarter.pending.samples is None


def test_a_failed_generation_is_saved_as_prompts_and_generated_again(setup, tmp_path, capsys):
    failing = make(setup, engine=RecordingEngine(fail=True))
    failing.draw(2, version=1)
    failing.save(tmp_path)
    assert "boom" in failing.pending.error
    engine = RecordingEngine()
    resumed = make(setup, engine=engine)
    resumed.load(tmp_path)
    assert "generated again from the resumed weights" in capsys.readouterr().out
    taken = resumed.take(2, version=2)
    assert engine.started == [([i.record.id for i in taken.items], 102)] and taken.version == 2
    peer = make(setup)  # a rank of the replica without the engine agrees on the version
    peer.load(tmp_path)
    assert peer.pending.regenerate and peer.take(2, version=2).version == 2 and not peer.pending.regenerate
    assert len(taken.samples) == PROMPTS
    (tmp_path / "pending_rollout" / "dp_00000.pt").rename(tmp_path / "pending_rollout" / "dp_00003.pt")
    torch.save({**torch.load(tmp_path / "pending_rollout" / "dp_00003.pt", weights_only=False), "dp": 2},
               tmp_path / "pending_rollout" / "dp_00003.pt")
    with pytest.raises(ValueError, match="1 share files for the 2 DP replicas"):
        make(setup).load(tmp_path)


def test_config_keys_validation_and_engine_gpus():
    from megatron_r1v.config import RunConfig, field_docs, load_config
    from megatron_r1v.validation import check_async_engine_gpus

    cfg = RunConfig()
    assert cfg.rollout.mode == "sync" and cfg.rollout.effective_tis_cap is None
    cfg.rollout.mode = "async"
    assert cfg.rollout.effective_tis_cap == 2.0  # the behaviour correction is always on
    cfg.rollout.tis_cap = 5.0
    assert cfg.rollout.effective_tis_cap == 5.0
    cfg.validate()
    cfg.grpo.dynamic_sampling, cfg.ssb.enabled = True, False
    with pytest.raises(ValueError, match="rollout.mode=async and grpo.dynamic_sampling=true"):
        cfg.validate()
    cfg.grpo.dynamic_sampling = False
    for bad, message in (("mode", "rollout.mode must be 'sync' or 'async', got 'later'"),
                         ("engine_gpu_offset", "rollout.engine_gpu_offset must be >= 0")):
        broken = RunConfig()
        setattr(broken.rollout, bad, "later" if bad == "mode" else -1)
        with pytest.raises(ValueError, match=message):
            broken.validate()
    with pytest.raises(ValueError, match="rollout.mode"):  # the loader's Literal check names the key
        load_config(None, ["rollout.mode=overlap"])
    docs = {name: doc for name, _, doc in field_docs()}
    assert "one-step-off" in docs["rollout.mode"] and "own GPUs" in docs["rollout.mode"]
    # 8-GPU node, 4 trainer ranks: the engine of the replica on GPU 0 (TP=2) goes to GPUs 4-5.
    cfg.rollout.engine_gpu_offset = 4
    assert check_async_engine_gpus(cfg.rollout, 0, 2, 4, 8) == 4
    assert check_async_engine_gpus(cfg.rollout, 2, 2, 4, 8) == 6
    with pytest.raises(ValueError, match="GPUs 7..8 .* but this node has 8"):
        check_async_engine_gpus(cfg.rollout, 3, 2, 4, 8)
    with pytest.raises(ValueError, match="engine_gpu_offset=4 puts the engine on GPUs the 8 trainer ranks"):
        check_async_engine_gpus(cfg.rollout, 0, 1, 8, 8)


class SyncRoundStub:
    """GRPOTrainer's sync-mode round on stubbed draws and rollouts."""

    from megatron_r1v.trainer.grpo import GRPOTrainer as _Trainer

    _rollout_round = _Trainer._rollout_round

    def __init__(self, pending) -> None:
        from megatron_r1v.config import RunConfig

        self.cfg, self.one_step_off = RunConfig(), SimpleNamespace(pending=pending)
        self.loader = SimpleNamespace(next_share=lambda n: [(k, f"drawn{k}") for k in range(n)])
        self.ctx = SimpleNamespace(device=torch.device("cpu"), rank=0)

    def _rollout(self, items, positions, step, failure, round_=0):
        return [f"group of {item} at {p}" for item, p in zip(items, positions)]


def test_sync_mode_trains_an_async_checkpoints_prompts_once():
    """An async run's checkpoint resumed with rollout.mode=sync: its step's prompts were already
    drawn (the data cursor is past them), so that step generates them instead of drawing again."""
    resumed = SimpleNamespace(step=3, items=["a", "b"], positions=[1, 3])
    stub = SyncRoundStub(resumed)
    assert stub._rollout_round(3) == (["a", "b"], [1, 3], ["group of a at 1", "group of b at 3"])
    assert stub.one_step_off.pending is None
    items, positions, _ = stub._rollout_round(4)
    assert items == [f"drawn{k}" for k in range(stub.cfg.grpo.prompts_per_step)]
    assert positions == list(range(stub.cfg.grpo.prompts_per_step))
