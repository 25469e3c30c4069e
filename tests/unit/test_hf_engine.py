"""HFRolloutEngine on a tiny random transformers InternVL (tiny-r1v, CPU, fp32)."""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

import megatron_r1v.rollout.hf_engine as hf_engine
from megatron_r1v.models.r1v.presets import get_preset
from megatron_r1v.rollout.engine import RolloutRequest, SamplingParams, sample_seed
from megatron_r1v.rollout.hf_engine import HFRolloutEngine, apply_repetition_penalty

ARCH = get_preset("tiny-r1v")
IMG, PER_TILE, SIDE = ARCH.image_token_id, ARCH.tokens_per_tile, ARCH.vision.image_size
# Engine log-probs come from the KV-cached, left-padded batch; the reference is one
# unpadded full forward. Both are fp32 with identical math: padding is masked with the
# dtype minimum (exp underflows to exactly 0) and positions count real tokens, so only
# summation order differs (cached single-token matmuls vs. full-sequence ones). With the
# scaled head, logits reach |16| and log-probs -28, where an fp32 ulp is ~2e-6; measured
# max difference 4.8e-6. A position, padding or temperature error moves log-probs > 1e-2.
LOGPROB_TOL = 2e-5


@pytest.fixture(scope="module")
def engine():
    eng = HFRolloutEngine.from_arch(ARCH, seed=0)
    # A random head gives near-uniform next-token distributions (logits ~0.1); scaled, the
    # distributions are peaked, so temperature and top-p change which tokens are drawn.
    head = dict(eng.named_weights())["lm_head.weight"]
    eng.update_weights([("lm_head.weight", head * 25)])
    return eng


def text_prompt(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, IMG, (n,), generator=torch.Generator().manual_seed(seed))  # never the image token


def image_prompt(tiles: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.cat([torch.randint(0, IMG, (3,), generator=gen), torch.full((tiles * PER_TILE,), IMG),
                     torch.randint(0, IMG, (4,), generator=gen)])
    return ids, torch.randn(tiles, 3, SIDE, SIDE, generator=gen)


def reference_logprobs(model, prompt, response, temperature, pixel_values=None) -> torch.Tensor:
    """log_softmax(logits / T) of each response token from one full forward, no cache."""
    with torch.no_grad():
        logits_LV = model(input_ids=torch.cat([prompt, response])[None], pixel_values=pixel_values).logits[0]
    logprobs_RV = F.log_softmax(logits_LV[prompt.numel() - 1: -1].float() / temperature, dim=-1)
    return logprobs_RV.gather(-1, response[:, None]).squeeze(-1)


def test_n_samples_per_request_and_determinism_for_a_seed(engine):
    requests = [RolloutRequest(f"p{i}", text_prompt(n, i)) for i, n in enumerate([5, 9, 3])]
    params = SamplingParams(n=4, max_new_tokens=6, seed=7)
    rng_before = torch.get_rng_state()
    first = engine.generate(requests, params)
    assert torch.equal(torch.get_rng_state(), rng_before), "the global RNG must not be used"
    again = engine.generate(requests, params)
    other = engine.generate(requests, SamplingParams(n=4, max_new_tokens=6, seed=8))

    assert [len(g) for g in first] == [4, 4, 4]
    assert [[s.prompt_id for s in g] for g in first] == [["p0"] * 4, ["p1"] * 4, ["p2"] * 4]
    flat = [s for g in first for s in g]
    assert all(s.response_ids.dtype == torch.int64 and s.logprobs.dtype == torch.float32 for s in flat)
    assert all(len(s.response_ids) == 6 and not s.finished and s.text == "" for s in flat)  # no stop tokens
    for a, b in zip(flat, (s for g in again for s in g)):
        assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.logprobs, b.logprobs)
    changed = sum(not torch.equal(a.response_ids, b.response_ids) for a, b in zip(flat, (s for g in other for s in g)))
    assert changed >= 6, f"another seed changed only {changed} of 12 samples"
    # The n samples of a request are distinct draws, not copies.
    assert all(len({tuple(s.response_ids.tolist()) for s in g}) > 1 for g in first)


def test_a_requests_samples_follow_its_stream_not_its_batch(engine):
    """How the GRPO trainer shares prompts over DP replicas: each request carries its position in
    the step's batch as its stream. Then a request's samples are the same generated alone, at
    another index or beside other requests (here with the 4 requests split 2 + 2, as two DP
    replicas would); without streams its index decides them, so moving it changes them."""
    ids_img, pix_img = image_prompt(1, 31)
    requests = [RolloutRequest("img", ids_img, pix_img, stream=0), RolloutRequest("a", text_prompt(7, 32), stream=1),
                RolloutRequest("b", text_prompt(3, 33), stream=2), RolloutRequest("c", text_prompt(9, 34), stream=3)]
    params = SamplingParams(n=3, temperature=1.3, top_p=0.95, max_new_tokens=8, seed=11)
    whole = engine.generate(requests, params)
    shared = engine.generate(requests[0::2], params) + engine.generate(requests[1::2], params)
    by_id = {g[0].prompt_id: g for g in shared}
    alone = engine.generate([requests[3]], params)[0]
    for want in whole:
        for a, b in zip(want, by_id[want[0].prompt_id]):
            assert torch.equal(a.response_ids, b.response_ids), a.prompt_id
            # Another batch shape: summation order only (see LOGPROB_TOL).
            torch.testing.assert_close(a.logprobs, b.logprobs, atol=LOGPROB_TOL, rtol=0)
    assert all(torch.equal(a.response_ids, b.response_ids) for a, b in zip(whole[3], alone))
    # Without a stream, "c" at index 0 draws request 0's streams: other samples.
    unstreamed = engine.generate([replace(requests[3], stream=None)], params)[0]
    assert sum(not torch.equal(a.response_ids, b.response_ids) for a, b in zip(whole[3], unstreamed)) >= 2
    with pytest.raises(ValueError, match="request a: stream must be None or an integer >= 0"):
        engine.generate([replace(requests[1], stream=-1)], params)


def test_stop_tokens_end_samples_and_max_new_tokens_cuts_the_rest(engine):
    stops = tuple(range(1, IMG, 3))
    requests = [RolloutRequest(f"p{i}", text_prompt(n, 10 + i)) for i, n in enumerate([5, 9, 3])]
    params = SamplingParams(n=8, max_new_tokens=6, temperature=2.0, seed=1, stop_token_ids=stops)
    groups = engine.generate(requests, params)
    flat = [s for g in groups for s in g]
    finished = [s for s in flat if s.finished]
    cut = [s for s in flat if not s.finished]
    assert len(finished) >= 8 and len(cut) >= 2, (len(finished), len(cut))  # both kinds occur
    assert len({len(s.response_ids) for s in finished}) >= 3  # samples of one batch end at different steps
    for s in finished:
        ids = s.response_ids.tolist()
        assert 1 <= len(ids) <= 6 and ids[-1] in stops and not set(ids[:-1]) & set(stops), ids
        assert len(s.logprobs) == len(ids)
    for s in cut:
        assert len(s.response_ids) == 6 and not set(s.response_ids.tolist()) & set(stops)


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.8)])
def test_logprobs_are_the_temperature_scaled_policy_of_a_full_forward(engine, temperature, top_p):
    requests = [RolloutRequest(f"p{i}", text_prompt(n, 20 + i)) for i, n in enumerate([4, 11])]
    params = SamplingParams(n=3, max_new_tokens=8, temperature=temperature, top_p=top_p, seed=3)
    in_nucleus = 0
    for req, group in zip(requests, engine.generate(requests, params)):
        for s in group:
            ref = reference_logprobs(engine.model, req.prompt_ids, s.response_ids, temperature)
            torch.testing.assert_close(s.logprobs, ref, atol=LOGPROB_TOL, rtol=0)
            # Every drawn token lies in the top-p nucleus of the (image-token-banned) distribution.
            with torch.no_grad():
                ids = torch.cat([req.prompt_ids, s.response_ids])[None]
                logits_RV = engine.model(input_ids=ids).logits[0, req.prompt_ids.numel() - 1: -1] / temperature
            logits_RV[:, IMG] = float("-inf")
            probs_RV = logits_RV.softmax(-1)
            for probs_V, tok in zip(probs_RV, s.response_ids):
                mass_before = probs_V[probs_V > probs_V[tok]].sum()
                assert mass_before < top_p + 1e-6, (float(mass_before), top_p)
                in_nucleus += 1
    assert in_nucleus == 2 * 3 * 8


def test_images_are_encoded_and_match_a_full_forward(engine):
    ids_a, pix_a = image_prompt(2, 30)
    ids_b, pix_b = image_prompt(1, 31)
    requests = [RolloutRequest("img2", ids_a, pix_a), RolloutRequest("text", text_prompt(7, 32)),
                RolloutRequest("img1", ids_b, pix_b)]
    groups = engine.generate(requests, SamplingParams(n=2, max_new_tokens=5, seed=4))
    for req, group in zip(requests, groups):
        for s in group:
            assert IMG not in s.response_ids.tolist()
            ref = reference_logprobs(engine.model, req.prompt_ids, s.response_ids, 1.0, req.pixel_values)
            torch.testing.assert_close(s.logprobs, ref, atol=LOGPROB_TOL, rtol=0)
    # The image reaches the logits: other pixels give other log-probs for the same tokens.
    s = groups[0][0]
    other = reference_logprobs(engine.model, ids_a, s.response_ids, 1.0, torch.randn_like(pix_a))
    assert (other - s.logprobs).abs().max() > 1e-2


def test_request_errors_name_the_prompt(engine):
    ids, pix = image_prompt(2, 40)
    with pytest.raises(ValueError, match=r"request bad: 8 image tokens .* 0 tiles"):
        engine.generate([RolloutRequest("bad", ids)], SamplingParams(n=1, max_new_tokens=1))
    with pytest.raises(ValueError, match=r"request short: 8 image tokens .* 1 tiles"):
        engine.generate([RolloutRequest("short", ids, pix[:1])], SamplingParams(n=1, max_new_tokens=1))


def test_update_weights_checks_names_and_shapes_before_copying():
    eng = HFRolloutEngine.from_arch(ARCH, seed=1)
    weights = {k: v.clone() for k, v in eng.named_weights()}
    norm = "model.language_model.norm.weight"
    bad = "model.multi_modal_projector.linear_1.weight"
    with pytest.raises(ValueError, match=rf"weight '{bad}': got shape \(3, 4\), the engine holds \(64, 96\)"):
        eng.update_weights([(norm, weights[norm] + 1), (bad, torch.zeros(3, 4))])
    assert torch.equal(dict(eng.named_weights())[norm], weights[norm])  # nothing copied
    with pytest.raises(KeyError, match="engine has no weight 'vision_tower.x'"):
        eng.update_weights([("vision_tower.x", torch.zeros(1))])


def test_weights_round_trip_and_release_resume(engine):
    requests = [RolloutRequest("a", text_prompt(6, 50))]
    params = SamplingParams(n=2, max_new_tokens=4, seed=5)
    # Another random init, then the first engine's weights: identical rollouts.
    copy = HFRolloutEngine.from_arch(ARCH, seed=2, state_dict=dict(engine.named_weights()))
    assert len(dict(copy.named_weights())) == len(dict(engine.named_weights())) > 50
    want = engine.generate(requests, params)
    got = copy.generate(requests, params)
    assert all(torch.equal(a.response_ids, b.response_ids) and torch.equal(a.logprobs, b.logprobs)
               for a, b in zip(want[0], got[0]))
    copy.release_memory()
    with pytest.raises(RuntimeError, match="resume_memory"):
        copy.generate(requests, params)
    norm = "model.language_model.norm.weight"
    copy.update_weights([(norm, dict(copy.named_weights())[norm] * 2)])  # allowed while released
    copy.resume_memory()
    moved = copy.generate(requests, params)
    assert any(not torch.equal(a.logprobs, b.logprobs) for a, b in zip(want[0], moved[0]))


def test_text_is_decoded_with_special_tokens_kept(engine):
    class Recorder:
        def __init__(self):
            self.calls = []

        def decode(self, ids, skip_special_tokens=True):
            self.calls.append((list(ids), skip_special_tokens))
            return "|".join(map(str, ids))

    tok = Recorder()
    eng = HFRolloutEngine(engine.model, tokenizer=tok)
    (group,) = eng.generate([RolloutRequest("a", text_prompt(4, 60))], SamplingParams(n=2, max_new_tokens=3, seed=0))
    assert [s.text for s in group] == ["|".join(map(str, s.response_ids.tolist())) for s in group]
    assert [kept for _, kept in tok.calls] == [False, False]


# --- greedy decoding ---------------------------------------------------------------------


def plain_greedy(model, prompt, max_new_tokens, stops=(), pixel_values=None):
    """transformers by hand: full forward each step (no cache, no padding), argmax with the
    image token banned; returns (tokens, untempered log-probs of them)."""
    ids, tokens, logprobs = prompt.clone(), [], []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits_V = model(input_ids=ids[None], pixel_values=pixel_values).logits[0, -1].float()
            logprobs_V = F.log_softmax(logits_V, dim=-1)
            logits_V[IMG] = float("-inf")
            tok = int(logits_V.argmax())
            tokens.append(tok)
            logprobs.append(float(logprobs_V[tok]))
            ids = torch.cat([ids, torch.tensor([tok])])
            if tok in stops:
                break
    return torch.tensor(tokens), torch.tensor(logprobs)


def test_temperature_zero_is_allowed_and_negative_is_not():
    assert SamplingParams(temperature=0).greedy and not SamplingParams(temperature=0.5).greedy
    for bad in (-0.1, float("nan")):
        with pytest.raises(ValueError, match="need temperature >= 0"):
            SamplingParams(temperature=bad)


def test_greedy_equals_a_plain_argmax_loop_for_every_seed(engine):
    ids_a, pix_a = image_prompt(2, 70)
    requests = [RolloutRequest("img", ids_a, pix_a), RolloutRequest("long", text_prompt(11, 71)),
                RolloutRequest("short", text_prompt(3, 72))]
    # Stops drawn from what the first greedy run produces, so that some samples end early.
    params = SamplingParams(n=2, temperature=0, max_new_tokens=7, seed=0)
    first = engine.generate(requests, params)
    stops = (int(first[1][0].response_ids[2]),)
    runs = [engine.generate(requests, SamplingParams(n=2, temperature=0, top_p=top_p, max_new_tokens=7, seed=seed,
                                                     stop_token_ids=stops))
            for seed, top_p in ((0, 1.0), (1, 0.3), (12345, 1.0))]
    finished = 0
    for i, req in enumerate(requests):
        want_ids, want_lp = plain_greedy(engine.model, req.prompt_ids, 7, stops, req.pixel_values)
        for groups in runs:
            for s in groups[i]:
                assert torch.equal(s.response_ids, want_ids), (req.prompt_id, s.response_ids, want_ids)
                assert IMG not in s.response_ids.tolist()
                # Untempered log-probs; same tolerance and reasoning as LOGPROB_TOL above.
                torch.testing.assert_close(s.logprobs, want_lp, atol=LOGPROB_TOL, rtol=0)
                finished += s.finished
    assert finished >= 2 * 3, "the stop token should end the 'long' request's samples"
    # Seeds and top_p change nothing: every run, every sample, bit for bit.
    flat = [[s for g in groups for s in g] for groups in runs]
    for other in flat[1:]:
        assert all(torch.equal(a.response_ids, b.response_ids) and torch.equal(a.logprobs, b.logprobs)
                   for a, b in zip(flat[0], other))


def test_greedy_never_picks_the_image_token(engine):
    logits_BV = torch.randn(3, ARCH.decoder.vocab_size, generator=torch.Generator().manual_seed(80))
    logits_BV[:, IMG] = 100.0  # the image token is everyone's argmax
    tokens_B, logprobs_B = engine._sample(logits_BV, SamplingParams(temperature=0), None)
    expected_B = torch.cat([logits_BV[:, :IMG], logits_BV[:, IMG + 1:]], dim=1).argmax(-1)  # IMG is the last id
    assert torch.equal(tokens_B, expected_B)
    assert torch.equal(logprobs_B, F.log_softmax(logits_BV, -1).gather(-1, tokens_B[:, None]).squeeze(-1))


# --- repetition penalty ------------------------------------------------------------------


def prompt_embeds(model, prompt, pixel_values=None) -> torch.Tensor:
    """[1, P, H] input embeddings of one prompt, built as ``InternVLModel.forward`` builds them:
    the token embeddings, with the image features (``get_image_features``: vision tower, pixel
    shuffle, projector) scattered in order into the image-token positions."""
    embeds = model.get_input_embeddings()(prompt[None])
    if pixel_values is not None:
        features = model.get_image_features(pixel_values=pixel_values, return_dict=True).pooler_output
        embeds = embeds.masked_scatter((prompt == IMG)[None, :, None].expand_as(embeds), features.to(embeds.dtype))
    return embeds


def transformers_generate(model, prompt, params, pixel_values=None, seed=None):
    """Skywork R1V's released inference on one unpadded request: transformers' ``generate`` from
    the prompt's ``inputs_embeds`` without ``input_ids`` (as ``model.chat`` calls its language
    model), so that its ``RepetitionPenaltyLogitsProcessor`` sees the generated ids only. No stop
    token (as the engine without stop_token_ids), the engine's image-token ban
    (``bad_words_ids``), a sampled run drawing from the global RNG seeded with ``params.seed``
    (the engine's generator for a call without streams), or with ``seed`` when given (a
    request with a stream: its sample's own generator).
    Returns (tokens, log_softmax(penalized logits / T) of them)."""
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    kwargs = dict(do_sample=False) if params.greedy else dict(do_sample=True, temperature=params.temperature,
                                                              top_p=params.top_p, top_k=None)
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        embeds = prompt_embeds(model, prompt, pixel_values)
        torch.manual_seed(params.seed if seed is None else seed)
        # transformers states the rule this test relies on (5.x).
        with pytest.warns(UserWarning, match="penalty only to newly generated tokens, not to the prompt"):
            out = model.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                                 max_new_tokens=params.max_new_tokens, repetition_penalty=params.repetition_penalty,
                                 bad_words_ids=[[IMG]], eos_token_id=None, pad_token_id=0,
                                 return_dict_in_generate=True, output_logits=True, **kwargs)
    tokens = out.sequences[0]  # generated ids only: the prompt was never ids
    assert tokens.numel() == params.max_new_tokens
    penalty = RepetitionPenaltyLogitsProcessor(params.repetition_penalty)
    logprobs = [F.log_softmax(penalty(out.sequences[:, :t], raw.clone()) / (params.temperature or 1.0), -1)[0, tok]
                for t, (raw, tok) in enumerate(zip(out.logits, tokens))]
    return tokens, torch.stack(logprobs)


def penalty_requests() -> list[RolloutRequest]:
    ids_a, pix_a = image_prompt(2, 90)
    return [RolloutRequest("img", ids_a, pix_a), RolloutRequest("long", text_prompt(20, 94)),
            RolloutRequest("short", text_prompt(4, 95))]


def test_prompt_embeds_are_the_models_own(engine):
    """The reference's inputs_embeds give the logits of the model's own forward from ids and pixels, bit for bit."""
    (req, *_) = penalty_requests()
    with torch.no_grad():
        from_ids = engine.model(input_ids=req.prompt_ids[None], pixel_values=req.pixel_values).logits
        from_embeds = engine.model(inputs_embeds=prompt_embeds(engine.model, req.prompt_ids, req.pixel_values)).logits
        text_only = engine.model(inputs_embeds=prompt_embeds(engine.model, req.prompt_ids)).logits
    assert torch.equal(from_ids, from_embeds)
    assert (text_only - from_ids).abs().max() > 1e-2  # the image features did reach the embeddings


@pytest.mark.parametrize("temperature,top_p,penalty,seed", [(0.0, 1.0, 1.3, 0), (0.6, 0.95, 1.05, 11),
                                                            (1.0, 1.0, 1.3, 5)])
def test_repetition_penalty_matches_transformers_generate_from_inputs_embeds(engine, temperature, top_p, penalty,
                                                                             seed):
    """Greedy, Skywork R1V's released setting and a plain sampled one give the ids of Skywork
    R1V's released inference (transformers' ``generate`` from ``inputs_embeds``, image included).

    Greedy: the requests share one left-padded batch with n=2 (rows must not interact) and each
    is compared with its own unpadded generate call. Sampled: one request per call with n=1, so
    that the engine's generator and generate's global one (the same CPU stream, seeded alike)
    make one draw per step from the same floats; the two top-p rules (drop a token once the mass
    ranked before it reaches top_p; transformers' ascending form of it) keep the same nucleus up
    to rounding and tie order at its boundary, which these fixed draws do not meet."""
    requests = penalty_requests()
    params = SamplingParams(n=1, temperature=temperature, top_p=top_p, max_new_tokens=16, seed=seed,
                            repetition_penalty=penalty)
    if params.greedy:
        groups = engine.generate(requests, replace(params, n=2))
    else:
        groups = [engine.generate([req], params)[0] for req in requests]
    for req, group in zip(requests, groups):
        want_ids, want_lp = transformers_generate(engine.model, req.prompt_ids, params, req.pixel_values)
        for s in group:
            assert s.response_ids.tolist() == want_ids.tolist(), req.prompt_id
            # Measured bit-equal for the one-request (sampled) calls; the padded greedy batch differs
            # from generate's unpadded run by summation order (measured 1.9e-6, see LOGPROB_TOL).
            torch.testing.assert_close(s.logprobs, want_lp, atol=LOGPROB_TOL, rtol=0)
    if not params.greedy:  # with a stream: the sample's own generator, the same rule as multinomial
        for req in requests:
            (streamed,) = engine.generate([replace(req, stream=5)], params)[0]
            want_ids, _ = transformers_generate(engine.model, req.prompt_ids, params, req.pixel_values,
                                                seed=sample_seed(params.seed, 5, 0))
            assert streamed.response_ids.tolist() == want_ids.tolist(), req.prompt_id


def test_repetition_penalty_one_is_skipped_and_above_one_breaks_a_repetition(engine, monkeypatch):
    requests = penalty_requests()
    sampled = SamplingParams(n=3, temperature=0.6, top_p=0.95, max_new_tokens=10, seed=2)
    greedy = SamplingParams(n=1, temperature=0, max_new_tokens=10)
    before = [engine.generate(requests, p) for p in (sampled, greedy)]
    # Penalty 1.0 never reaches the penalty code (which would cost a [rows, V] mask per call and
    # two where's per step): with it made to fail, explicit 1.0 still gives the default's bits.

    def unreachable(*args, **kwargs):
        raise AssertionError("penalty code ran with repetition_penalty=1.0")

    monkeypatch.setattr(hf_engine, "apply_repetition_penalty", unreachable)
    for params, want in zip((sampled, greedy), before):
        got = engine.generate(requests, replace(params, repetition_penalty=1.0))
        for a, b in zip((s for g in want for s in g), (s for g in got for s in g)):
            assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.logprobs, b.logprobs)
    monkeypatch.undo()
    # The image request's greedy continuation repeats token 0 (a no-op penalty would keep it);
    # 1.3 keeps its first two tokens (neither was generated before) and then breaks the run.
    plain = before[1][0][0].response_ids.tolist()
    assert plain[1:] == [0] * 9, plain
    (penalized,), _, _ = engine.generate(requests, replace(greedy, repetition_penalty=1.3))
    ids = penalized.response_ids.tolist()
    assert ids[:2] == plain[:2] and ids.count(0) == 1, ids


def test_repetition_penalty_ignores_the_prompt(engine):
    """A token that occurs only in the prompt is not penalized (the old prompt-marking rule, that
    of ``generate(input_ids=...)``, fails both checks below)."""
    # Nothing has been generated at the first step, so it is the unpenalized one, bit for bit, for
    # every sample (the prompts' ids are all over these distributions).
    requests = penalty_requests()
    sampled = SamplingParams(n=3, temperature=0.6, top_p=0.95, max_new_tokens=4, seed=2)
    plain, penalized = (engine.generate(requests, replace(sampled, repetition_penalty=p)) for p in (1.0, 1.3))
    for a, b in zip((s for g in plain for s in g), (s for g in penalized for s in g)):
        assert a.response_ids[0] == b.response_ids[0] and torch.equal(a.logprobs[:1], b.logprobs[:1])
    # The image prompt extended by its greedy continuation's first two tokens (x, 0) ends in the
    # repeated 0, which the model then keeps choosing. With the penalty, 0 is still the first
    # choice (it occurs only in the prompt) and is then dropped (it was generated).
    greedy = SamplingParams(n=1, temperature=0, max_new_tokens=4)
    (img, *_) = requests
    repeated = RolloutRequest("rep", torch.cat([img.prompt_ids, plain_greedy(engine.model, img.prompt_ids, 2,
                                                                            pixel_values=img.pixel_values)[0]]),
                              img.pixel_values)
    assert repeated.prompt_ids[-1] == 0
    (want,), = engine.generate([repeated], greedy)
    (got,), = engine.generate([repeated], replace(greedy, repetition_penalty=1.3))
    assert want.response_ids.tolist() == [0] * 4
    assert got.response_ids[0] == 0 and torch.equal(got.logprobs[:1], want.logprobs[:1])
    assert 0 not in got.response_ids[1:].tolist(), got.response_ids


def test_apply_repetition_penalty_is_transformers_rule():
    logits_BV = torch.tensor([[2.0, -2.0, 0.0, 3.0], [2.0, -2.0, 0.0, 3.0]])
    seen_BV = torch.tensor([[True, True, True, False], [False, False, False, False]])
    got = apply_repetition_penalty(logits_BV, seen_BV, 2.0)
    assert torch.equal(got, torch.tensor([[1.0, -4.0, 0.0, 3.0], [2.0, -2.0, 0.0, 3.0]]))  # rows independent


@pytest.mark.parametrize("bad", [0.0, -1.05, float("nan"), float("inf")])
def test_repetition_penalty_must_be_finite_and_positive(bad):
    with pytest.raises(ValueError, match="repetition_penalty must be finite and > 0"):
        SamplingParams(repetition_penalty=bad)
    assert SamplingParams(repetition_penalty=0.9).repetition_penalty == 0.9  # < 1 (encouraging repeats) is legal


# --- per-request token budgets ----------------------------------------------------------


def budget_requests() -> list[RolloutRequest]:
    ids_a, pix_a = image_prompt(1, 100)
    return [RolloutRequest("img", ids_a, pix_a), RolloutRequest("long", text_prompt(30, 101)),
            RolloutRequest("short", text_prompt(3, 102))]


def test_a_request_budget_cuts_its_own_rows_only(engine):
    """Budgets None (the call's 8), 2 and 20 (more than the call's: 8 applies) against the same
    batch without budgets: the unbudgeted request's samples are bit-identical and the others are
    their prefixes, bit for bit. A stop within the budget still finishes a sample; one beyond it
    does not (the sample was cut)."""
    params = SamplingParams(n=3, temperature=1.5, max_new_tokens=8, seed=6, stop_token_ids=tuple(range(1, IMG, 5)))
    requests = budget_requests()
    full = engine.generate(requests, params)
    budgets = {"img": None, "long": 2, "short": 20}
    cut = engine.generate([replace(r, max_new_tokens=budgets[r.prompt_id]) for r in requests], params)
    long_full = [(len(s.response_ids), s.finished) for s in full[1]]
    assert long_full == [(8, False), (2, True), (4, True)]  # cut, a stop at the budget, a stop past it
    for req, want_group, got_group in zip(requests, full, cut):
        budget = min(8, budgets[req.prompt_id] or 8)
        for want, got in zip(want_group, got_group):
            keep = min(len(want.response_ids), budget)
            assert torch.equal(got.response_ids, want.response_ids[:keep]), req.prompt_id
            assert torch.equal(got.logprobs, want.logprobs[:keep]), req.prompt_id
            assert got.finished == (want.finished and len(want.response_ids) <= budget), req.prompt_id
    assert [(len(s.response_ids), s.finished) for s in cut[1]] == [(2, False), (2, True), (2, False)]


def test_a_request_alone_or_beside_a_smaller_budget(engine):
    """The image request alone with budget 6 and batched after a request of budget 2 (a longer,
    padded prompt): greedy, the same tokens, and log-probs equal to LOGPROB_TOL. Not bit for bit:
    the batch's shape changes the summation order, and a sampled run would also draw its random
    numbers in another order (the module docstring: sample k may change when requests join)."""
    img, long, _ = budget_requests()
    params = SamplingParams(n=2, temperature=0, max_new_tokens=16)
    (alone,) = engine.generate([replace(img, max_new_tokens=6)], params)
    short, batched = engine.generate([replace(long, max_new_tokens=2), replace(img, max_new_tokens=6)], params)
    assert [len(s.response_ids) for s in short] == [2, 2]
    for a, b in zip(alone, batched):
        assert len(a.response_ids) == 6 and torch.equal(a.response_ids, b.response_ids)
        torch.testing.assert_close(a.logprobs, b.logprobs, atol=LOGPROB_TOL, rtol=0)


def test_decoding_stops_at_the_largest_budget(engine):
    forwards = []
    hook = engine.model.register_forward_hook(lambda *args: forwards.append(1))
    try:
        groups = engine.generate([RolloutRequest("a", text_prompt(5, 103), max_new_tokens=3),
                                  RolloutRequest("b", text_prompt(9, 104), max_new_tokens=2)],
                                 SamplingParams(n=2, max_new_tokens=50, seed=1))
    finally:
        hook.remove()
    assert [[len(s.response_ids) for s in g] for g in groups] == [[3, 3], [2, 2]]
    assert not any(s.finished for g in groups for s in g)
    assert len(forwards) == 3  # the prefill and two decode steps, not 49


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "4"])
def test_a_request_budget_must_be_a_positive_integer(engine, bad):
    with pytest.raises(ValueError, match=r"request b: max_new_tokens must be None or an integer >= 1"):
        engine.generate([RolloutRequest("a", text_prompt(3, 105)), RolloutRequest("b", text_prompt(3, 106),
                                                                                 max_new_tokens=bad)],
                        SamplingParams(n=1, max_new_tokens=1))


# --- loading checkpoints -----------------------------------------------------------------


def test_skywork_checkpoint_loads_with_the_logits_of_its_transformers_export(tmp_path):
    """The same weights written in the released (skywork) layout and by transformers'
    save_pretrained load through load_hf_engine into engines with identical logits."""
    import json

    from safetensors.torch import save_file

    from megatron_r1v.checkpoint.hf_layouts import convert_layout
    from megatron_r1v.data.tokenizer import save_hf_tokenizer, train_tokenizer
    from megatron_r1v.models.r1v.hf_config import skywork_config
    from megatron_r1v.models.r1v.hf_mapping import SKYWORK_LAYOUT, TRANSFORMERS_LAYOUT
    from megatron_r1v.rollout.hf_engine import load_hf_engine

    arch = get_preset("tiny-r1v-chat")  # its image token id (639) is the project tokenizer's <IMG_CONTEXT>
    source = HFRolloutEngine.from_arch(arch, seed=3)
    # Init constants (norms of ones, zero biases, layer scales) made distinct, so a swapped
    # or dropped tensor cannot go unnoticed.
    gen = torch.Generator().manual_seed(4)
    source.update_weights([(n, w + torch.randn(w.shape, generator=gen) * 0.2) for n, w in source.named_weights()])
    weights = dict(source.named_weights())
    tokenizer = train_tokenizer(["The answer is \\boxed{42}. Count the red squares."], arch.decoder.vocab_size)

    sky, tr = tmp_path / "skywork", tmp_path / "transformers"
    sky.mkdir()
    save_file(dict(convert_layout(weights.__getitem__, arch, TRANSFORMERS_LAYOUT, SKYWORK_LAYOUT)),
              str(sky / "model.safetensors"))
    (sky / "config.json").write_text(json.dumps(skywork_config(arch)))
    source.model.save_pretrained(tr)
    for folder in (sky, tr):
        save_hf_tokenizer(tokenizer, folder)

    loaded_sky, arch_sky, tok_sky = load_hf_engine(sky)
    loaded_tr, arch_tr, _ = load_hf_engine(tr)
    assert (arch_sky.decoder, arch_sky.vision, arch_sky.adapter, arch_sky.image_token_id) == \
        (arch.decoder, arch.vision, arch.adapter, arch.image_token_id)
    assert tok_sky.convert_tokens_to_ids("<IMG_CONTEXT>") == 639 and loaded_sky.tokenizer is tok_sky
    got = dict(loaded_sky.named_weights())
    assert set(got) == set(weights) and all(torch.equal(got[n], w) for n, w in weights.items())

    per_tile, side = arch.tokens_per_tile, arch.vision.image_size
    ids = torch.cat([torch.arange(5), torch.full((3 * per_tile,), 639), torch.arange(100, 112)])[None]
    pixels = torch.randn(3, 3, side, side, generator=gen)
    with torch.no_grad():
        logits_sky = loaded_sky.model(input_ids=ids, pixel_values=pixels).logits
        logits_tr = loaded_tr.model(input_ids=ids, pixel_values=pixels).logits
        logits_src = source.model(input_ids=ids, pixel_values=pixels).logits
    # Bit-identical weights in the same fp32 model class with the same (eager) attention
    # on the same input: the same operations, hence identical numbers, not merely close.
    assert torch.equal(logits_sky, logits_tr) and torch.equal(logits_sky, logits_src)
    assert logits_sky.abs().max() > 0.1  # not a degenerate all-zero model


def test_loading_refuses_a_tokenizer_with_another_image_token(tmp_path):
    import json

    from safetensors.torch import save_file

    from megatron_r1v.checkpoint.hf_layouts import convert_layout
    from megatron_r1v.data.tokenizer import save_hf_tokenizer, train_tokenizer
    from megatron_r1v.models.r1v.hf_config import skywork_config
    from megatron_r1v.models.r1v.hf_mapping import SKYWORK_LAYOUT, TRANSFORMERS_LAYOUT
    from megatron_r1v.rollout.hf_engine import load_hf_engine

    arch = get_preset("tiny-r1v-chat")
    weights = dict(HFRolloutEngine.from_arch(arch, seed=0).named_weights())
    save_file(dict(convert_layout(weights.__getitem__, arch, TRANSFORMERS_LAYOUT, SKYWORK_LAYOUT)),
              str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(skywork_config(arch)))
    save_hf_tokenizer(train_tokenizer(["some text"], 600), tmp_path)  # <IMG_CONTEXT> = 599
    with pytest.raises(ValueError, match="img_context_token_id=639 but tokenizer .* has <IMG_CONTEXT> at id 599"):
        load_hf_engine(tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json does not exist"):
        load_hf_engine(tmp_path / "missing")
