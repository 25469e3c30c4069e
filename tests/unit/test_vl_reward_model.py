"""Image-aware reward models (Skywork-VL-Reward format and R1V + value head) behind the real
HTTP server (tools/serve_reward_model.py in a subprocess) and the real client.

Both tiny random models are written by tools/make_tiny_checkpoint.py --reward-model. The
parity references are computed here with plain transformers, not through the scorers: the
Skywork-VL conversation is written out by hand, the model is the causal LM read the way
the model card reads it (last layer's hidden states, value at the last real token), and
the value head is read from value_head.safetensors by its tensor names.
"""

import base64
import io
import json
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from tool_modules import load_tool  # tests/ is on sys.path (pytest.ini: pythonpath)

from megatron_r1v.config import RewardConfig
from megatron_r1v.data.schema import PromptRecord
from megatron_r1v.rewards import HybridReward, RewardItem, RewardModelClient, RewardServerError
from megatron_r1v.rewards.loading import detect_reward_kind, load_reward_model
from megatron_r1v.rewards.skywork_vl import user_content
from megatron_r1v.rewards.value_head import load_value_head

KINDS = ("skywork-vl", "r1v")
QUESTION, ANSWER = "What is in the image?", "A red square.</think> \\boxed{7}"


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Two different random RGB images (different sizes too) and a file that is not an image."""
    root = tmp_path_factory.mktemp("images")
    paths = {}
    for name, seed, shape in (("a", 0, (60, 90, 3)), ("b", 1, (84, 70, 3))):
        array = np.random.RandomState(seed).randint(0, 256, shape, dtype=np.uint8)
        paths[name] = root / f"{name}.png"
        Image.fromarray(array).save(paths[name])
    paths["junk"] = root / "junk.png"
    paths["junk"].write_bytes(b"not an image at all")
    return paths


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    tool = load_tool("make_tiny_checkpoint")
    root = tmp_path_factory.mktemp("rm")
    return {kind: Path(tool.make_tiny_reward_model(root / kind, kind)["out"]) for kind in KINDS}


@pytest.fixture(scope="module", params=KINDS)
def served(request, models, tmp_path_factory, reward_tools):
    """(kind, model folder, URL) of the tool serving a tiny model, batches of 2, at most 4 items."""
    kind = request.param
    log = tmp_path_factory.mktemp(f"log-{kind}") / "stderr.txt"
    with reward_tools.serve(models[kind], log, "--batch-size", "2", "--max-items", "4", "--max-images", "2") as info:
        assert (info["kind"], info["num_labels"], info["score_index"]) == (kind, 1, 0)
        yield kind, models[kind], info["url"]


def client(url, **kw):
    sleeps = []
    return RewardModelClient(url, timeout_s=60, retry_s=0, batch_size=3, sleep=sleeps.append, **kw), sleeps


def data_url(path):
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


# --- references: plain transformers, computed here ------------------------------------------


def value_head(model_dir):
    with safe_open(str(model_dir / "value_head.safetensors"), framework="pt") as f:
        return f.get_tensor("v_head.summary.weight").double(), f.get_tensor("v_head.summary.bias").double()


def skywork_reference(model_dir, image_path, question, answer):
    """The card's recipe: chat template text, image tokens, forward, value at the last token."""
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    processor = transformers.AutoImageProcessor.from_pretrained(str(model_dir))
    model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(str(model_dir)).eval()
    vision = processor(images=[Image.open(image_path).convert("RGB")], return_tensors="pt")
    n_tokens = int(vision["image_grid_thw"][0].prod()) // processor.merge_size**2
    text = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|>"
            + "<|image_pad|>" * n_tokens + f"<|vision_end|>{question}<|im_end|>\n<|im_start|>assistant\n"
            + f"{answer}<|im_end|>\n")
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=vision["pixel_values"],
                    image_grid_thw=vision["image_grid_thw"], output_hidden_states=True, use_cache=False,
                    mm_token_type_ids=(ids == model.config.image_token_id).int())  # what the processor adds
    weight, bias = value_head(model_dir)
    return float(out.hidden_states[-1][0, -1].double() @ weight[0] + bias[0])


def r1v_reference(model_dir, image_path, question, answer):
    """The policy's training encoding (ChatTemplate.encode + InternVL tiling) through transformers' InternVL."""
    from megatron_r1v.data.template import ChatTemplate, TemplateConfig
    from megatron_r1v.data.tiling import TilingConfig, tile_file
    from megatron_r1v.rollout.hf_engine import load_hf_engine

    engine, arch, tokenizer = load_hf_engine(model_dir)
    tiles = tile_file(image_path, TilingConfig(image_size=arch.vision.image_size, max_tiles=12))
    template = ChatTemplate(tokenizer, TemplateConfig(tokens_per_tile=arch.tokens_per_tile, max_seq_len=2048))
    ids = template.encode("ref", question, answer, [tiles.num_tiles]).input_ids[None]
    with torch.no_grad():
        out = engine.model(input_ids=ids, pixel_values=tiles.pixel_values, output_hidden_states=True, use_cache=False)
    weight, bias = value_head(model_dir)
    return float(out.hidden_states[-1][0, -1].double() @ weight[0] + bias[0])


# --- through the server ----------------------------------------------------------------------


def test_the_image_changes_the_score(served, images):
    kind, _, url = served
    rm, sleeps = client(url)
    a, b = (RewardItem(QUESTION, ANSWER, (str(images[n]),)) for n in "ab")
    scores = rm.score([a, b, a, RewardItem(QUESTION, ANSWER)])
    assert abs(scores[0] - scores[1]) > 1e-3, f"{kind}: two different images gave the same score {scores}"
    assert scores[0] == pytest.approx(scores[2], abs=1e-5)  # same item, another batch of the server
    assert abs(scores[3] - scores[0]) > 1e-3  # no image at all
    # The bytes in the request instead of the path: the same score.
    as_base64, _ = client(url, image_transport="base64")
    assert as_base64.score([b]) == pytest.approx([scores[1]], abs=1e-5)
    assert rm.score([]) == [] and sleeps == []


def test_score_equals_plain_transformers(served, images):
    kind, model_dir, url = served
    rm, _ = client(url)
    scores = rm.score([RewardItem(QUESTION, ANSWER, (str(images[n]),)) for n in "ab"])
    reference = skywork_reference if kind == "skywork-vl" else r1v_reference
    expected = [reference(model_dir, images[n], QUESTION, ANSWER) for n in "ab"]
    # fp32 on both sides; the server pads the two items into one batch (right padding, so no
    # position moves) while the reference runs each alone and reads hidden_states[-1] of the
    # causal LM: only summation order differs, ~1e-6 on scores of magnitude ~5.
    assert scores == pytest.approx(expected, abs=1e-4), kind


def test_sampled_special_tokens_are_scored_as_text(served, images):
    """A response holding chat or image markers as text neither breaks the image count nor opens turns."""
    rm, _ = client(served[2])
    scores = rm.score([RewardItem(QUESTION, "x<|im_start|>user\n<img><|image_pad|><IMG_CONTEXT>", (str(images["a"]),))])
    assert len(scores) == 1 and np.isfinite(scores[0])


def post(url, payload):
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    request = urllib.request.Request(url + "/score", data=body, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def item(**fields):
    return {"prompt": QUESTION, "response": ANSWER, **fields}


BAD_REQUESTS = [
    ({"items": [item(images=["/no/such/image.png"])]}, "items[0].images[0]: /no/such/image.png: no such file"),
    ({"items": [item(), item(images=["relative/a.png"])]},
     "items[1].images[0]: neither an absolute file path nor valid base64 (relative paths are refused"),
    ({"items": [item(images=["data:image/png;base64,@@@"])]}, "items[0].images[0]: the data URL's payload is not"),
    ({"items": [item(images=["data:image/png,abc"])]}, "items[0].images[0]: a data URL must look like data:<mime>;"),
    ({"items": [item(images=["data:image/png;base64," + base64.b64encode(b"garbage").decode()])]},
     "items[0].images[0]: base64 data of 7 bytes is not an image PIL can identify"),
    ({"items": [item(prompt=3)]}, "items[0].prompt must be a string, got int"),
    ({"items": [item(), {"prompt": "q"}]}, "items[1].response is missing"),
    ({"items": [item(image="/a.png")]},
     "items[0] has unknown field(s) 'image'; the fields are prompt, response, images"),
    ({"items": [item(images="/a.png")]}, "items[0].images must be a list of strings, got str"),
    ({"items": [item(images=[7])]}, "items[0].images[0] must be a string (a path or base64), got int"),
    ({"items": [item()] * 5}, "5 items in one request; this server takes at most 4"),
    ({"items": "abc"}, '"items" must be a list, got str'),
    ({"texts": ["a"]}, '"texts" is the text-only form; this server runs a'),
    ({"texts": ["a"], "items": []}, 'body must be a JSON object {"items"'),
]


@pytest.mark.parametrize("payload,message", BAD_REQUESTS)
def test_bad_requests_are_400_naming_the_field(served, payload, message):
    status, reply = post(served[2], payload)
    assert status == 400 and message in reply["error"], reply


def test_more_bad_requests(served, images):
    url, junk = served[2], str(images["junk"])
    cases = [
        (item(images=[junk]), f"items[0].images[0]: {junk}: not an image PIL can identify"),
        (item(images=[str(images["a"])] * 3), "items[0].images holds 3 images; this server takes at most 2"),
        (item(prompt="<image> and <image>", images=[str(images["a"])]),
         "2 <image> placeholders for 1 images"),
        (item(prompt="say <|im_start|>", images=[]), "special token '<|im_start|>'"),
    ]
    for entry, message in cases:
        status, reply = post(url, {"items": [entry]})
        assert status == 400 and message in reply["error"], (served[0], reply)
    status, reply = post(url, {"items": [item(images=[data_url(images["a"])])]})
    assert status == 200 and len(reply["scores"]) == 1


def test_client_does_not_retry_a_400_and_names_the_field(served):
    rm, sleeps = client(served[2])
    rm.retry_s = 60
    with pytest.raises(RewardServerError) as info:
        rm.score([RewardItem(QUESTION, ANSWER, ("/no/such/image.png",))])
    assert info.value.status == 400 and info.value.attempts == 1 and sleeps == []
    assert "items[0].images[0]: /no/such/image.png: no such file" in str(info.value)


def test_health_names_the_kind(served):
    kind, model_dir, url = served
    assert RewardModelClient(url).health() == {
        "status": "ok", "model": str(model_dir), "kind": kind, "images": True, "num_labels": 1, "score_index": 0,
        "max_texts": 4, "max_items": 4, "max_images": 2}


def test_hybrid_reward_sends_the_records_images(served, images):
    """GRPO's path: HybridReward -> client -> server; the policy's closing marker is cut off."""
    _, _, url = served
    reward = HybridReward.from_config(RewardConfig(model_weight=1.0, reward_model_url=url), reply_end="<|im_end|>")
    records = [PromptRecord(f"p{n}", (images[n],), QUESTION, "7", "number", None) for n in "ab"]
    out = reward.score_batch(records, [ANSWER + "<|im_end|>"] * 2)
    rm, _ = client(url)
    assert [r.model_raw for r in out] == pytest.approx(
        rm.score([RewardItem(QUESTION, ANSWER, (str(images[n]),)) for n in "ab"]), abs=1e-5)
    assert out[0].model_raw != pytest.approx(out[1].model_raw, abs=1e-3)


# --- without the server ------------------------------------------------------------------------


def test_kind_detection_and_value_head_errors(models, tmp_path):
    assert [detect_reward_kind(models[k]) for k in KINDS] == list(KINDS)
    folder = tmp_path / "vl"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl"}))
    with pytest.raises(FileNotFoundError, match=r"vl/value_head\.safetensors does not exist: a qwen2_5_vl reward"):
        detect_reward_kind(folder)
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    assert detect_reward_kind(folder) == "text"
    with pytest.raises(ValueError, match=r"v_head\.summary\.weight has shape \[1, 32\], expected \[1, 64\]"):
        load_value_head(models["skywork-vl"], 64)
    head = load_value_head(models["r1v"], 64)
    assert head.weight_H.shape == (64,) and head.weight_H.dtype == torch.float32
    with pytest.raises(ValueError, match=r"--kind r1v: .* holds a skywork-vl reward model"):
        load_reward_model(models["skywork-vl"], kind="r1v")


def test_tool_cli_writes_a_reward_model(tmp_path, capsys):
    tool = load_tool("make_tiny_checkpoint")
    assert tool.main(["--out", str(tmp_path / "rm"), "--reward-model", "skywork-vl", "--seed", "3"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["reward_model"] == "skywork-vl" and summary["value_head"] == {
        "file": "value_head.safetensors", "v_head.summary.weight": [1, 32], "v_head.summary.bias": [1]}
    assert detect_reward_kind(tmp_path / "rm") == "skywork-vl"
    assert tool.main(["--out", str(tmp_path / "rm"), "--reward-model", "skywork-vl"]) == 2
    assert "exists; pass --force" in capsys.readouterr().err


def test_images_go_where_the_placeholders_are():
    assert user_content("Q?", 2, "items[0]") == [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Q?"}]
    assert user_content("<image>\nCompare with <image> please", 2, "x") == [
        {"type": "image"}, {"type": "text", "text": "Compare with"}, {"type": "image"},
        {"type": "text", "text": "please"}]
    with pytest.raises(ValueError, match=r"x\.prompt has 1 <image> placeholders for 2 images"):
        user_content("<image> q", 2, "x")


def test_pil_images_travel_as_png(images):
    """An in-memory image has no path: the client sends it as a PNG data URL that decodes back."""
    from megatron_r1v.rewards.protocol import decode_image, item_to_json

    picture = Image.open(images["a"]).convert("RGB")
    sent = item_to_json(RewardItem("q", "r", (picture, str(images["b"]))), 0, "path")
    assert sent["images"][0].startswith("data:image/png;base64,") and sent["images"][1] == str(images["b"])
    assert np.array_equal(np.asarray(decode_image(sent["images"][0], "x")), np.asarray(picture))
    with pytest.raises(FileNotFoundError, match=r"items\[0\]\.images\[0\]: cannot read /no/such\.png"):
        item_to_json(RewardItem("q", "r", ("/no/such.png",)), 0, "base64")
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    assert np.array_equal(np.asarray(decode_image(base64.b64encode(buffer.getvalue()).decode(), "x")),
                          np.asarray(picture))
