"""Benchmarks in their public formats, pass@1 over k samples, rule and judge scoring.

    python -m megatron_r1v.evaluate --benchmark NAME --data PATH --model HF_DIR [--out DIR] \\
        [--samples K] [--temperature 0.6] [--top-p 0.95] [--repetition-penalty 1.05] \\
        [--max-new-tokens 64000] [--batch-size 8] [--seed 0] [--limit N] \\
        [--engine hf|sglang] [--tp N] [--device D] [--tokenizer DIR] [--max-tiles 12] \\
        [--judge-url URL [--judge-model NAME] [--judge-concurrency 8]] \\
        [--tiler auto|dali|pil] [--tiler-threads 2] [--chat-template auto|qwq|qwen2.5|r1-distill]
    python -m megatron_r1v.evaluate --suite FILE --model HF_DIR [--out DIR] [the same options]

Benchmarks (``evaluate.formats``, read from local files, nothing is downloaded): ``mathvista``
(testmini JSON or parquet), ``mmmu`` (validation / dev parquet, a file or a folder of them),
``mathverse`` (testmini JSON or parquet), ``olympiadbench`` (JSON or parquet, open-ended
questions), ``aime`` (text JSONL / JSON / parquet), ``pope`` (yes/no hallucination questions),
``project`` (the project's prompts JSONL, ``data/schema.py``). Each item is shown with its
benchmark's usual instruction through the model's chat template with thinking (the
generation prompt opens ``<think>``), images tiled exactly as in training.

Every item gets ``--samples`` K responses (defaults: the released inference's temperature
0.6, top-p 0.95, repetition penalty 1.05, up to 64000 new tokens, cut to what the model's
positions leave). Each response is scored by the benchmark's rules (``evaluate.scoring``:
math-verify numbers and expressions with MathVista's precision and units, option letters
or texts, MMMU's open answers, lists, yes/no) and, with ``--judge-url``, by an LLM judge
through an OpenAI-compatible endpoint (``evaluate.judge``, prompt in
``evaluate/judge_prompt.md``); a response is correct when either says so.

Output (``evaluate.runner``): the run folder ``--out`` holds ``samples.jsonl`` (one line per
item: every response's text, extracted answer, rule verdict, judge verdict, format, tokens,
whether it ended), ``run.json`` and ``result.json``; rerunning the command resumes a killed
run. The last stdout line is the result, ``{"benchmark", "num_items", "k", "pass@1",
"pass@k", "by_type": {...}, "pass@1_by_run", "format", "lengths": {mean / p90 tokens, also
for correct and incorrect responses}, "truncation_rate", "judge"?, "hallucination"?, ...}``
(``evaluate.metrics``). A suite (``evaluate.suite``) runs several benchmarks with one model
load and writes ``suite.md`` and ``suite.json``. Progress goes to stderr; user errors print
``error: ...`` and exit with status 2 before the model is loaded.

The rest of the package serves the data tools too: ``evaluate.generation`` loads a
checkpoint for generation and prepares prompts as the trainer does.
"""

from megatron_r1v.evaluate.generation import (
    GenerationSetup,
    Generator,
    SampleScore,
    build_requests,
    check_generation_arguments,
    load_generator,
    prepare_generation,
    score_text,
)

__all__ = ["GenerationSetup", "Generator", "SampleScore", "build_requests", "check_generation_arguments",
           "load_generator", "prepare_generation", "score_text"]
