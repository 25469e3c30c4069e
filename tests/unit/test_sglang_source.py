"""rollout/sglang_engine.py checked against the source of the sglang it was written for.

tools/ensure_venv.sh installs the locked sglang wheel (0.5.23) with --no-deps: without its GPU
stack it cannot be imported (and importing it would patch transformers), so its files are read
with ``ast`` and never imported. Every name the adapter hands to sglang or reads back (entry
points, engine arguments, methods and their keyword arguments, the weight-update format and its
payload, memory tags, sampling fields, output keys, environment switches) must exist there under
that name; and what the fake of tests/unit/test_sglang_engine.py accepts and does is what that
source does. A new sglang pin that renames or drops one of them fails here, not on a GPU.
"""

import ast
import functools
import importlib.metadata
import importlib.util
import inspect
import pickle
import re
import sys
from pathlib import Path

import pytest
import torch
from test_sglang_engine import (  # tests/unit/ is on sys.path while its tests run
    GENERATE_ARGS, MEMORY_TYPES, SAMPLING_FIELDS, ByteBucket, FakeEngine, Meta, make, out)

from megatron_r1v.rollout import sglang_engine as adapter
from megatron_r1v.rollout.engine import RolloutRequest, SamplingParams
from megatron_r1v.rollout.sglang_engine import WeightCodec, flattened_payloads

VERSION = "0.5.23"
REPO = Path(__file__).resolve().parents[2]
SPEC = importlib.util.find_spec("sglang")  # a top-level name: found without importing it
pytestmark = pytest.mark.skipif(SPEC is None, reason="sglang is not installed here (tools/ensure_venv.sh installs "
                                "the locked wheel --no-deps into the repository's .venv)")
ROOT = Path(SPEC.submodule_search_locations[0]) if SPEC is not None else None


@functools.lru_cache(maxsize=None)
def tree(module: str) -> ast.Module:
    """The parsed source of ``module`` (a dotted sglang module or package name)."""
    path = ROOT.parent / module.replace(".", "/")
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    assert path.is_file(), f"sglang {VERSION} has no module {module} ({path})"
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def top(module: str, name: str) -> ast.AST:
    """The class or function ``name`` defined at the top of ``module``."""
    for node in tree(module).body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name:
            return node
    raise AssertionError(f"sglang {VERSION}: {module} defines no class or function {name}")


def method(module: str, cls: str, name: str) -> ast.FunctionDef:
    for node in top(module, cls).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name:
            return node
    raise AssertionError(f"sglang {VERSION}: {module}.{cls} has no method {name}")


def params(fn: ast.FunctionDef) -> dict:
    """Keyword-passable parameters -> default (a literal; ``inspect.Parameter.empty`` when none)."""
    a = fn.args
    positional = a.posonlyargs + a.args
    defaults = [inspect.Parameter.empty] * (len(positional) - len(a.defaults)) + list(a.defaults)
    pairs = list(zip(a.args, defaults[len(a.posonlyargs):])) + list(zip(a.kwonlyargs, a.kw_defaults))
    return {arg.arg: (inspect.Parameter.empty if d in (None, inspect.Parameter.empty) else ast.literal_eval(d))
            for arg, d in pairs if arg.arg != "self"}


def class_with(module: str, name: str) -> str:
    """The one class of ``module`` that defines method ``name``."""
    (cls,) = [n.name for n in tree(module).body if isinstance(n, ast.ClassDef) and any(
        isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)) and f.name == name for f in n.body)]
    return cls


def fields(cls: ast.ClassDef) -> list[str]:
    """Annotated class-level names: the fields of a dataclass or msgspec struct."""
    return [n.target.id for n in cls.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)]


def strings(node: ast.AST) -> set[str]:
    return {n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)}


def constants(module: str) -> dict:
    """Module-level ``NAME = literal`` assignments (lists of names resolved to their values)."""
    values: dict = {}
    for node in tree(module).body:
        if isinstance(node, ast.Assign) and all(isinstance(t, ast.Name) for t in node.targets):
            value = node.value
            if isinstance(value, ast.List) and all(isinstance(e, ast.Name) for e in value.elts):
                value = [values.get(e.id) for e in value.elts]
            else:
                try:
                    value = ast.literal_eval(value)
                except ValueError:
                    continue
            values.update((t.id, value) for t in node.targets)
    return values


def defines(module: str, name: str) -> bool:
    """Whether ``from module import name`` finds ``name``: defined, assigned, imported or star-imported."""
    body = tree(module).body
    for node in body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name:
            return True
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            return True
        if isinstance(node, (ast.Import, ast.ImportFrom)) and any((a.asname or a.name) == name for a in node.names):
            return True
    exported = constants(module).get("__all__")
    for node in body:
        if isinstance(node, ast.ImportFrom) and [a.name for a in node.names] == ["*"] and not name.startswith("_"):
            if defines(node.module, name) and (exported is None or name in exported):
                return True
    return (ROOT.parent / module.replace(".", "/") / f"{name}.py").is_file()  # a submodule


ADAPTER = ast.parse(Path(adapter.__file__).read_text(encoding="utf-8"))


def adapter_function(name: str, cls: str = "SGLangRolloutEngine") -> ast.FunctionDef:
    for node in ast.walk(ADAPTER):
        if isinstance(node, ast.ClassDef) and node.name == cls:
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name == name:
                    return item
    for node in ADAPTER.body:
        if isinstance(node, ast.FunctionDef) and node.name == name:
            return node
    raise AssertionError(f"sglang_engine.py has no {name}")


def test_the_installed_sglang_is_the_version_the_adapter_was_written_against():
    assert importlib.metadata.version("sglang") == VERSION
    assert constants("sglang._version")["__version__"] == VERSION
    assert defines("sglang", "__version__")  # what the adapter logs (sgl.__version__)
    assert f"sglang=={VERSION}" in (REPO / "constraints-cpu-py311.txt").read_text().splitlines()
    assert f'"sglang>={VERSION}"' in (REPO / "setup.py").read_text()
    assert f"Written against sglang {VERSION}" in adapter.__doc__


def test_every_sglang_import_of_the_adapter_resolves():
    imports = [(node.module, a.name) for node in ast.walk(ADAPTER) if isinstance(node, ast.ImportFrom)
               and node.module and node.module.split(".")[0] == "sglang" for a in node.names]
    modules = [a.name for node in ast.walk(ADAPTER) if isinstance(node, ast.Import) for a in node.names
               if a.name.split(".")[0] == "sglang"]
    assert sorted(imports) == [("sglang.srt.utils", "MultiprocessingSerializer"),
                               ("sglang.srt.weight_sync.tensor_bucket", "FlattenedTensorBucket")]
    assert sorted(modules) == ["sglang", "sglang.srt.constants"]
    for module, name in imports:
        assert defines(module, name), f"sglang {VERSION}: no {name} in {module}"
    for module in modules:
        tree(module)
    # sgl.Engine: a lazy alias of the engine class, whose arguments are ServerArgs' fields.
    (lazy,) = [n.value for n in tree("sglang").body if isinstance(n, ast.Assign)
               and [t.id for t in n.targets if isinstance(t, ast.Name)] == ["Engine"]]
    assert isinstance(lazy, ast.Call) and lazy.func.id == "LazyImport"
    target, cls = (ast.literal_eval(a) for a in lazy.args)
    assert (target, cls) == ("sglang.srt.entrypoints.engine", "Engine")
    # The codec: FlattenedTensorBucket(named_tensors=...) and MultiprocessingSerializer.serialize(obj).
    assert "named_tensors" in params(method("sglang.srt.weight_sync.tensor_bucket", "FlattenedTensorBucket",
                                            "__init__"))
    for name in ("get_flattened_tensor", "get_metadata"):
        method("sglang.srt.weight_sync.tensor_bucket", "FlattenedTensorBucket", name)
    serialize = method("sglang.srt.utils.common", "MultiprocessingSerializer", "serialize")
    assert [d.id for d in serialize.decorator_list] == ["staticmethod"]
    assert params(serialize) == {"obj": inspect.Parameter.empty, "output_str": False}  # bytes by default


def server_args_fields() -> set[str]:
    """ServerArgs' fields: those of the namespaces server_args.py assembles it from."""
    server_args = tree("sglang.srt.server_args")
    (namespaces,) = [n.value for n in server_args.body if isinstance(n, ast.Assign)
                     and any(isinstance(t, ast.Name) and t.id == "_INPUT_NAMESPACES" for t in n.targets)]
    origin = {a.asname or a.name: n.module for n in server_args.body if isinstance(n, ast.ImportFrom) for a in n.names}
    names = set(fields(top("sglang.srt.server_args", "ServerArgs")))
    for ns in namespaces.elts:
        names.update(fields(top(origin[ns.id], ns.id)))
    return names


def test_engine_arguments_are_server_args_fields():
    init = adapter_function("__init__")
    passed = set()
    for node in ast.walk(init):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call) and getattr(node.value.func, "id", "") \
                == "dict" and [getattr(t, "id", "") for t in node.targets] == ["kwargs"]:
            passed.update(k.arg for k in node.value.keywords if k.arg)
        if isinstance(node, ast.Subscript) and getattr(node.value, "id", "") == "kwargs" \
                and isinstance(node.ctx, ast.Store):
            passed.add(ast.literal_eval(node.slice))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "setdefault" \
                and getattr(node.func.value, "id", "") == "engine_kwargs":
            passed.add(ast.literal_eval(node.args[0]))
    assert passed == {"model_path", "tp_size", "base_gpu_id", "mem_fraction_static", "random_seed",
                      "enable_memory_saver", "enable_weights_cpu_backup", "max_running_requests", "load_format"}
    known = server_args_fields()
    # trust_remote_code: passed through in test_sglang_engine; enable_deterministic_inference: what
    # per-request sampling seeds need (the module docstring).
    missing = sorted(passed - known) + sorted({"trust_remote_code", "enable_deterministic_inference"} - known)
    assert not missing, f"sglang {VERSION}'s ServerArgs has no fields {missing}"
    assert "dummy" in constants("sglang.srt.arg_groups.choices")["LOAD_FORMAT_CHOICES"]
    # Engine(**kwargs) builds ServerArgs(**kwargs).
    init = method("sglang.srt.entrypoints.engine", "Engine", "__init__")
    assert init.args.kwarg.arg == "kwargs" and not params(init)
    assert any(isinstance(n, ast.Call) and getattr(n.func, "attr", "") == "server_args_class"
               and [k.value.id for k in n.keywords if k.arg is None] == ["kwargs"] for n in ast.walk(init))


def test_the_fakes_methods_have_sglangs_signatures():
    called = {n.func.attr for n in ast.walk(ADAPTER) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
              and isinstance(n.func.value, ast.Attribute) and n.func.value.attr == "engine"}
    assert called == {"release_memory_occupation", "resume_memory_occupation", "update_weights_from_tensor",
                      "flush_cache", "generate", "shutdown"}
    for name in sorted(called - {"generate"}):  # generate: its own test
        want = params(method("sglang.srt.entrypoints.engine", "Engine", name))
        fake = {p.name: p.default for p in inspect.signature(getattr(FakeEngine, name)).parameters.values()
                if p.name != "self"}
        assert fake == want, (name, fake, want)
    # The keyword arguments the adapter passes, by name.
    for node in ast.walk(ADAPTER):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in called - {
                "generate"} and getattr(node.func.value, "attr", "") == "engine":
            used = {k.arg for k in node.keywords}
            assert used <= set(params(method("sglang.srt.entrypoints.engine", "Engine", node.func.attr))), used


def test_weight_update_format_payload_and_results():
    engine = "sglang.srt.entrypoints.engine"
    # Pre-serialized payloads, one per TP rank, for load_format="flattened_bucket"; rank r loads entry r.
    assert "flattened_bucket" in strings(method(engine, "Engine", "_serialize_tensors_per_rank"))
    own = method("sglang.srt.managers.tp_worker", class_with("sglang.srt.managers.tp_worker",
                                                             "deserialize_own_rank"), "deserialize_own_rank")
    assert any(isinstance(n, ast.Subscript) and getattr(n.value, "id", "") == "serialized_named_tensors"
               for n in ast.walk(own))
    updater = "sglang.srt.model_executor.model_runner_components.weight_updater"
    assert "flattened_bucket" in strings(method(updater, "WeightUpdater", "update_weights_from_tensor"))
    reads = {ast.literal_eval(n.slice) for n in ast.walk(method(updater, "WeightUpdater",
                                                                 "_update_weights_from_flattened_bucket"))
             if isinstance(n, ast.Subscript) and isinstance(n.slice, ast.Constant)}
    bf16 = [("a", torch.randn(2, 3).to(torch.bfloat16)), ("b", torch.randn(5).to(torch.bfloat16))]
    ((payload, serialized),) = flattened_payloads(bf16, 2, WeightCodec(ByteBucket, pickle.dumps))
    assert set(payload) == reads == {"flattened_tensor", "metadata"} and len(serialized) == 2
    # The metadata record, field for field (the fake's Meta), and sglang's unpickling allow-list
    # admits it, the shapes and the dtypes a sync sends (CUDA tensors travel as IPC handles).
    bucket = "sglang.srt.weight_sync.tensor_bucket"
    assert fields(top(bucket, "FlattenedTensorMetadata")) == list(Meta.__dataclass_fields__)
    (allowed,) = [n.value for n in top("sglang.srt.utils.common", "SafeUnpickler").body if isinstance(n, ast.Assign)
                  and [t.id for t in n.targets] == ["ALLOWED_GLOBALS"]]
    allowed = ast.literal_eval(allowed)
    assert {(bucket, "FlattenedTensorMetadata"), ("torch", "Size"), ("torch", "bfloat16"), ("torch", "float32"),
            ("torch", "float16"), ("torch.multiprocessing.reductions", "rebuild_cuda_tensor")} <= allowed
    # Results: (success, message) from update_weights_from_tensor, FlushCacheReqOutput(.success) from flush_cache.
    mixin = "sglang.srt.managers.tokenizer_control_mixin"
    assert ast.unparse(method(mixin, "TokenizerControlMixin", "update_weights_from_tensor").returns) == \
        "Tuple[bool, str]"
    assert ast.unparse(method(mixin, "TokenizerControlMixin", "flush_cache").returns) == "FlushCacheReqOutput"
    assert fields(top("sglang.srt.managers.io_struct", "FlushCacheReqOutput"))[0] == "success"


def load_tensor_bucket(monkeypatch):
    """sglang's tensor_bucket.py on its own (it imports only dataclasses, typing and torch), under a
    name of its own (registered for the test, so that its metadata records pickle)."""
    imported = {a.name.split(".")[0] for n in tree("sglang.srt.weight_sync.tensor_bucket").body
                if isinstance(n, (ast.Import, ast.ImportFrom)) for a in (n.names if isinstance(n, ast.Import) else
                                                                         [ast.alias(n.module)])}
    assert imported == {"dataclasses", "typing", "torch"}
    path = ROOT / "srt" / "weight_sync" / "tensor_bucket.py"
    spec = importlib.util.spec_from_file_location("_sglang_tensor_bucket_source", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


def test_the_fakes_bucket_flattens_like_sglangs_and_sglang_rebuilds_what_the_adapter_sends(monkeypatch):
    real = load_tensor_bucket(monkeypatch)
    tensors = [("w", torch.randn(3, 4).to(torch.bfloat16)), ("b", torch.randn(4)), ("h", torch.randn(2, 2).half()),
               ("v", torch.randn(5).to(torch.bfloat16))]
    ours, theirs = ByteBucket(tensors), real.FlattenedTensorBucket(named_tensors=tensors)
    assert torch.equal(ours.get_flattened_tensor(), theirs.get_flattened_tensor())
    assert ours.get_flattened_tensor().dtype == theirs.get_flattened_tensor().dtype == torch.uint8
    assert [tuple(vars(m).values()) for m in ours.get_metadata()] == \
        [tuple(vars(m).values()) for m in theirs.get_metadata()]
    # What the scheduler does with each payload (_update_weights_from_flattened_bucket).
    sent = []
    for payload, serialized in flattened_payloads(tensors, 2, WeightCodec(real.FlattenedTensorBucket, pickle.dumps)):
        for data in map(pickle.loads, serialized):
            rebuilt = real.FlattenedTensorBucket(flattened_tensor=data["flattened_tensor"], metadata=data["metadata"])
            assert len(payload["metadata"]) == len(data["metadata"])
            sent.append(rebuilt.reconstruct_tensors())
    for rank0, rank1 in zip(sent[::2], sent[1::2]):  # both TP ranks get the same bucket
        assert [n for n, _ in rank0] == [n for n, _ in rank1] and all(
            torch.equal(a, b) for (_, a), (_, b) in zip(rank0, rank1))
    got = {name: t for rank_tensors in sent[::2] for name, t in rank_tensors}
    assert sorted(got) == sorted(n for n, _ in tensors) and len(sent) == 2 * 3  # a call per dtype
    for name, t in tensors:
        assert got[name].dtype == t.dtype and torch.equal(got[name], t)


def test_memory_tags_and_what_resuming_does():
    values = constants("sglang.srt.constants")
    assert (values["GPU_MEMORY_TYPE_WEIGHTS"], values["GPU_MEMORY_TYPE_KV_CACHE"],
            values["GPU_MEMORY_TYPE_CUDA_GRAPH"]) == (adapter.WEIGHTS, adapter.KV_CACHE, adapter.CUDA_GRAPH)
    assert tuple(values["GPU_MEMORY_ALL_TYPES"]) == MEMORY_TYPES and set(MEMORY_TYPES) == set(adapter._RESUME_ORDER)
    assert "GPU_MEMORY_TYPE_CUDA_GRAPH" in strings(adapter_function("_sglang_memory_tags"))
    for name in ("release_memory_occupation", "resume_memory_occupation"):
        assert fields(top("sglang.srt.managers.io_struct", name.title().replace("_", "") + "ReqInput")) == ["tags"]
    # The scheduler: no tags is every tag, and resuming one that is not released fails
    # (offload_tags.remove), as the fake does.
    updater = "sglang.srt.managers.scheduler_components.weight_updater"
    for name, call in (("release_memory_occupation", "add"), ("resume_memory_occupation", "remove")):
        fn = method(updater, class_with(updater, name), name)
        source = ast.unparse(fn)
        assert "tags = GPU_MEMORY_ALL_TYPES" in source and f"self.offload_tags.{call}(tag)" in source
    eng, fake = make(memory_tags=MEMORY_TYPES)
    with pytest.raises(KeyError):
        fake.resume_memory_occupation(tags=[adapter.KV_CACHE])
    eng.release_memory()
    eng.resume_memory()
    assert fake.offload_tags == set()


def test_generate_inputs_sampling_fields_and_outputs():
    engine = "sglang.srt.entrypoints.engine"
    generate = params(method(engine, "Engine", "generate"))
    assert set(GENERATE_ARGS) <= set(generate) and generate["return_logprob"] is False
    sp_module = "sglang.srt.sampling.sampling_params"
    cls = top(sp_module, "SamplingParams")
    assert set(SAMPLING_FIELDS) <= set(fields(cls))
    assert any(k.arg == "kw_only" and k.value.value is True for k in cls.keywords)  # unknown keys fail
    assert "self.sampling_params_class(**sampling_kwargs)" in ast.unparse(tree("sglang.srt.managers.tokenizer_manager"))
    # The ranges the fake checks, as verify() words them.
    verify = strings(method(sp_module, "SamplingParams", "verify"))
    for message in ("top_p must be in (0, 1]", "repetition_penalty must be in (0, 2]",
                    "sampling_seed must be in [-2**63, 2**63 - 1]"):
        assert any(text.startswith(message) for text in verify), message
    assert "Dict[str, float]" in [ast.unparse(n.annotation) for n in cls.body if isinstance(n, ast.AnnAssign)
                                  and n.target.id == "logit_bias"][0]
    # The adapter sends only those names (the fake refuses others): every field, over these calls.
    eng, fake = make()
    sent = set()
    req = [RolloutRequest("p", torch.tensor([1, 2]))]
    for params_ in (SamplingParams(n=1, temperature=0.0, max_new_tokens=1),
                    SamplingParams(n=2, temperature=0.7, top_p=0.9, max_new_tokens=1, stop_token_ids=(3,))):
        fake.outputs = [out([4], [-0.5], "stop")] * params_.n
        eng.generate(req, params_)
        sent |= {k for sp in fake.generated["sampling_params"] for k in sp}
        assert set(fake.generated) <= set(GENERATE_ARGS)
    assert sent == set(SAMPLING_FIELDS)
    # Outputs: {"text", "output_ids", "meta_info"}; meta_info["finish_reason"] a {"type": ...}
    # dict; meta_info["output_token_logprobs"] (logprob, token_id, text) tuples.
    manager = tree("sglang.srt.managers.tokenizer_manager")
    dict_keys = [{k.value for k in n.keys if isinstance(k, ast.Constant)} for n in ast.walk(manager)
                 if isinstance(n, ast.Dict)]
    assert {"text", "output_ids", "meta_info"} in dict_keys
    assert any("finish_reason" in keys for keys in dict_keys)
    assert any(isinstance(t, ast.Subscript) and getattr(t.value, "id", "") == "meta_info"
               and isinstance(t.slice, ast.Constant) and t.slice.value == "output_token_logprobs"
               for n in ast.walk(manager) if isinstance(n, ast.Assign) for t in n.targets)
    detok = method("sglang.srt.managers.tokenizer_manager", "TokenizerManager", "detokenize_logprob_tokens")
    assert "(logprob, token_id, None)" in ast.unparse(detok)
    batch = tree("sglang.srt.managers.schedule_batch")
    types = {ast.literal_eval(v) for n in ast.walk(batch) if isinstance(n, ast.Dict)
             for k, v in zip(n.keys, n.values) if isinstance(k, ast.Constant) and k.value == "type"
             and isinstance(v, ast.Constant)}
    assert {"stop", "length", "abort"} <= types
    read = strings(adapter_function("_to_sample"))
    assert {"meta_info", "finish_reason", "type", "stop", "length", "output_token_logprobs", "output_ids",
            "text"} <= read
    # Pre-tokenized images: {"format": "processor_output", "pixel_values": tiles} dicts, a list per
    # request ([] without images).
    assert "isinstance(self.image_data[0], list)" in ast.unparse(
        method("sglang.srt.managers.io_struct", "GenerateReqInput", "_normalize_image_data"))
    internvl = "sglang.srt.multimodal.processors.internvl"
    assert "processor_output" in strings(method(internvl, class_with(internvl, "_has_special_format"),
                                                "_has_special_format"))
    assert {"processor_output", "pixel_values"} <= strings(tree("sglang.srt.multimodal.processors.base_processor"))


def test_environment_switches_the_adapter_sets_or_refuses_exist():
    envs = {t.id for n in top("sglang.srt.environ", "Envs").body if isinstance(n, (ast.Assign, ast.AnnAssign))
            for t in (n.targets if isinstance(n, ast.Assign) else [n.target]) if isinstance(t, ast.Name)}
    named = {s for s in strings(ADAPTER) if re.fullmatch(r"(SGLANG|SGL)_[A-Z_]+", s)}
    assert named == {"SGLANG_RETURN_ORIGINAL_LOGPROB", "SGL_RETURN_ORIGINAL_LOGPROB", "SGLANG_VLM_CACHE_SIZE_MB",
                     "SGL_VLM_CACHE_SIZE_MB"}
    switches = {s for s in named if s.startswith("SGLANG_")}
    assert switches <= envs, switches - envs
    # Importing sglang copies each SGL_X to SGLANG_X, so the adapter reads both spellings.
    assert "new_key = key.replace('SGL_', 'SGLANG_', 1)" in ast.unparse(top("sglang.srt.environ",
                                                                         "_handle_deprecated_envs"))
    assert "_handle_deprecated_envs()" in [ast.unparse(n) for n in tree("sglang.srt.environ").body]  # at import
    assert {s.replace("SGLANG_", "SGL_", 1) for s in switches} <= named
    # What counts as set: EnvBool's true values, EnvInt's int().
    parse = method("sglang.srt.environ", "EnvBool", "parse")
    (true_values,) = [ast.literal_eval(n.test.comparators[0]) for n in ast.walk(parse) if isinstance(n, ast.If)
                      and isinstance(n.body[0], ast.Return) and n.body[0].value.value is True]
    assert sorted(true_values) == sorted(adapter._ENV_TRUE)
    assert "return int(value)" in ast.unparse(method("sglang.srt.environ", "EnvInt", "parse"))
    assert adapter._is_zero("00") and adapter._is_zero(" 0 ") and not adapter._is_zero("1")
