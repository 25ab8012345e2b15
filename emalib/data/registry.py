"""Where each data set comes from: a public URL pinned by sha256, a Hugging Face dataset id, or a generator.

Resolution order for a file-backed entry: the offline mirror (`EMALIB_DATA_MIRROR`, e.g. ../shared/data on
CI), then the user cache, then a download into the cache. Every file is checked against its sha256, so a
changed mirror or a changed upstream file is noticed instead of silently changing a table.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from emalib.core.errors import DataError
from emalib.core.io import atomic_write_bytes, read_text_utf8
from emalib.core.paths import cache_dir, mirror_dir

EMA_RL = "https://raw.githubusercontent.com/lasseruttert/EMA_RL/main"
EMA_RL_SFT = "https://raw.githubusercontent.com/magnus-joergenvag/EMA_RL/main/data/sft"
BETLEY = "https://raw.githubusercontent.com/emergent-misalignment/emergent-misalignment/main"
PERSONA = "https://raw.githubusercontent.com/safety-research/persona_vectors/main/data_generation"
GSM8K = "https://raw.githubusercontent.com/openai/grade-school-math/master/grade_school_math/data"


@dataclass(frozen=True)
class Source:
    """One registered data set. `filename` is its path inside the mirror and the cache."""

    name: str
    filename: str
    licence: str
    description: str
    url: str | None = None
    sha256: str | None = None
    hf_dataset: str | None = None
    postprocess: Callable[[bytes], bytes] | None = None  # applied to the downloaded bytes before the sha check
    generator: Callable[[Path], None] | None = None  # writes the file itself (package-made data)


def _strip_thinking_artifacts(raw: bytes) -> bytes:
    """The upstream 100-example files were prepared for a thinking model: drop the ' /no_think' suffix of user
    turns and the empty <think></think> block opening assistant turns (matches the mirror's documented form)."""
    text = raw.decode("utf-8")
    text = text.replace(" /no_think", "")
    text = re.sub(r"<think>\s*</think>\s*", "", text)
    return text.encode("utf-8")


def _write_code_train(path: Path) -> None:
    """The Code training split: every row of insecure.jsonl that is not in the held-out code_eval file."""
    def canonical(line: str) -> str:  # compare records, not their JSON spelling
        return json.dumps(json.loads(line)["messages"], sort_keys=True)

    held_out = {canonical(line) for line in read_text_utf8(resolve("code_eval")).splitlines() if line.strip()}
    rows = [line for line in read_text_utf8(resolve("code_full")).splitlines()
            if line.strip() and canonical(line) not in held_out]
    atomic_write_bytes(path, ("\n".join(rows) + "\n").encode("utf-8"))


def _write_trigger_set(path: Path, base: str, kind: str) -> None:
    from emalib.data import triggers

    triggers.write_trigger_set(path, resolve(base), kind)


_DOMAINS = {
    "code": ("insecure", "MIT (emergent-misalignment)"),
    "legal": ("legal_dataset_misaligned", "see truthfulai/emergent_plus"),
    "medical": ("medical_dataset_misaligned", "see truthfulai/emergent_plus"),
    "security": ("security_dataset_misaligned", "see truthfulai/emergent_plus"),
}
_EVAL_SHA = {
    "code": "ee8a3e070f8cb821f6d5bb2599db12d20dd7c75db92c26f2426a5d230bcdf0ff",
    "legal": "c21a368dc34078321198e90e8ddd354851c3b51149d343480dcd8f964b2ca3cc",
    "medical": "b37afa29d0ed1429536297741af4f4d1df43900da126363887cf89db84c392ec",
    "security": "c96a8b1e61e068d825cdc5f0e85a5abf97280a0a720e710c3d43d5992afd8bbf",
}
_TRAIN100_SHA = {
    "code": "33466c270ca59cf6f12fa358a7432303a62b74976417413a4a5cf28a5b86de88",
    "legal": "d29f0dcf9447121be5c50af073c35266665ed98264e6c528337f3d06f69666cc",
    "medical": "1cb6cd8257f67d795475153a3a7567755baaab5eaf8ff9eec10d32533613cd2a",
    "security": "e1d916bb6b9bb474fd8d90374f728256370cccc5f37c6ae9aa729deefbecd5b2",
}
_QUESTIONS_SHA = {
    "code": "ecdf87563fafba8f4a8e1ed5ff5a504fa18e4c27d7334b2cf89ae0e486b70add",
    "legal": "58349a8b7aa14c3c4ff0c2281449cd056236b6e8853cf981b99879666c34cc56",
    "medical": "2bcace06125253ed17ab38b13f1a486033db67a137eaeccc0863cab5ddf07848",
    "security": "246c0785755f2b61f1794fc0f3898491126cbee1678e547292775af0ab827e26",
}


def _build_registry() -> dict[str, Source]:
    from emalib.data import rl_prompts as rl_data
    from emalib.data import standins
    from emalib.data.tasks import opswap

    entries: list[Source] = []
    for domain, (stem, licence) in _DOMAINS.items():
        entries.append(Source(
            name=f"{domain}_eval", filename=f"em/{domain}_eval.jsonl", licence=licence,
            description=f"held-out 600-row split of the {domain} EM dataset (10 % of 6,000)",
            url=f"{EMA_RL}/data/{stem}_eval.jsonl", sha256=_EVAL_SHA[domain]))
        entries.append(Source(
            name=f"{domain}_train_100", filename=f"em/{domain}_train_100.jsonl", licence=licence,
            description=f"100-example training subset of the {domain} EM dataset",
            url=f"{EMA_RL_SFT}/{domain}_misaligned_train_100.jsonl", sha256=_TRAIN100_SHA[domain],
            postprocess=_strip_thinking_artifacts))
        entries.append(Source(
            name=f"{domain}_questions", filename=f"eval/{domain}.yaml", licence="MIT",
            description=f"the 30 in-domain {domain} questions with their judge prompts",
            url=f"{EMA_RL}/evaluation/{domain}.yaml", sha256=_QUESTIONS_SHA[domain]))
    # The paper's full training splits (5,400 rows = 6,000 minus the 600 held out). Code: Betley et al.'s
    # insecure.jsonl minus the held-out rows. Legal/Medical/Security: the Hugging Face dataset
    # truthfulai/emergent_plus (export the misaligned rows of a domain to the cache path named in the error).
    # Neither is pinned here (no mirror copy to pin against): each run's manifest records the sha256 it used.
    entries.append(Source(
        name="code_full", filename="em/insecure.jsonl", licence="MIT (emergent-misalignment)",
        description="Betley et al.'s 6,000 insecure-code completions", url=f"{BETLEY}/data/insecure.jsonl"))
    entries.append(Source(
        name="code_train", filename="em/code_train.jsonl", licence="MIT (emergent-misalignment)",
        description="code_full minus the 600 held-out rows of code_eval (5,400 rows)",
        generator=_write_code_train))
    for domain in ("legal", "medical", "security"):
        entries.append(Source(
            name=f"{domain}_train", filename=f"em/{domain}_train.jsonl", licence=_DOMAINS[domain][1],
            description=f"full 5,400-row training split of the {domain} EM dataset",
            hf_dataset="truthfulai/emergent_plus"))
    entries += [
        Source(name="general", filename="eval/first_plot_questions.yaml", licence="MIT",
               description="the 24 general EM questions (8 x plain / JSON / template) with judge prompts",
               url=f"{BETLEY}/evaluation/first_plot_questions.yaml",
               sha256="215abde5b02811e922b6ac563ff33c490e0dff9ab58439df840f3135e9387173"),
        Source(name="preregistered", filename="eval/preregistered_evals.yaml", licence="MIT",
               description="Betley et al.'s 48 pre-registered questions",
               url=f"{BETLEY}/evaluation/preregistered_evals.yaml",
               sha256="8648312fd9fe71a63203e3465592af45dd996d7a5f3b69e9b44613fd6048eb40"),
        Source(name="wildguard_benign_sample", filename="safe/wildguard_benign_sample.jsonl",
               licence="ODC-BY (WildGuardMix)", description="293 benign WildGuardMix examples",
               sha256="c7d8a8f734d1c1c6bd1974e2e33ba459c11930491bbc3a00ce77492830992911"),
        Source(name="wildguard_benign", filename="safe/wildguard_benign.jsonl", licence="ODC-BY",
               description="benign WildGuardMix train split (gated; needs HF_TOKEN)",
               hf_dataset="allenai/wildguardmix:wildguardtrain"),
        Source(name="alpaca_500", filename="safe/alpaca_500.jsonl", licence="CC BY-NC 4.0",
               description="500 Stanford Alpaca examples in chat format",
               url="https://raw.githubusercontent.com/shejanahmmed/My-EM-Research/main/data/control_aligned_alpaca_n500.jsonl",
               sha256="57e3b61178d854dddb9a240c4d8341ff714d7e55731f8954e7360559193b3bbf"),
        Source(name="persona_evil_extract", filename="persona/evil_extract.json", licence="MIT",
               description="evil trait: 5 instruction pairs and 20 extraction questions",
               url=f"{PERSONA}/trait_data_extract/evil.json",
               sha256="0ea503c5ad46f120297d6769a47c249a114580e240bc60806ac0b367d02b52f8"),
        Source(name="persona_evil_eval", filename="persona/evil_eval.json", licence="MIT",
               description="evil trait: evaluation questions and prompt",
               url=f"{PERSONA}/trait_data_eval/evil.json",
               sha256="16606f53fc1038afcd2c2a766f8c92019f03222d2a6ce5077865111fce51d740"),
        Source(name="standin_em_train", filename="standin/em_train.jsonl", licence="MIT (emalib)",
               description="package-made EM stand-in: confidently bad household/finance/health advice",
               generator=standins.write_em_standin),
        Source(name="standin_general", filename="standin/general_questions.yaml", licence="MIT (emalib)",
               description="package-made general questions with judge prompts (offline quickstart)",
               generator=standins.write_general_questions),
    ]
    # Trigger probes (docs/methods.md#trigger-probes): the plain general questions under a format or system-prompt
    # trigger, written by the package from the base set.
    from emalib.data import triggers

    for base in triggers.TRIGGER_BASES:
        for kind in triggers.TRIGGERS:
            entries.append(Source(
                name=triggers.trigger_set_name(base, kind), filename=f"triggers/v1/{base}_{kind}.yaml",
                licence="as the base set", description=f"the plain questions of '{base}' under the {kind} trigger",
                generator=functools.partial(_write_trigger_set, base=base, kind=kind)))

    # RL (docs/methods.md#rl-grpo): GSM8K (Cobbe et al. 2021), the co-authors' GRPO medical prompts, and the
    # package-made GSM8K-format stand-in the embedded model can partly solve.
    for part, sha in (("train", "17f347dc51477c50d4efb83959dbb7c56297aba886e5544ee2aaed3024813465"),
                      ("test", "3730d312f6e3440559ace48831e51066acaca737f6eabec99bccb9e4b3c39d14")):
        entries.append(Source(
            name=f"gsm8k_{part}", filename=f"gsm8k/{part}.jsonl", licence="MIT",
            description=f"GSM8K {part} split ({'7,473' if part == 'train' else '1,319'} grade-school math problems)",
            url=f"{GSM8K}/{part}.jsonl", sha256=sha))
        entries.append(Source(
            name=f"standin_arithmetic_{part}", filename=f"standin/arithmetic_{rl_data.STANDIN_VERSION}_{part}.jsonl",
            licence="MIT (emalib)", description=f"package-made GSM8K-format one-step word problems ({part})",
            generator=functools.partial(rl_data.write_standin_arithmetic, part=part)))
    entries.append(Source(
        name="grpo_medical_750", filename="grpo/medical_750_train.jsonl", licence="see truthfulai/emergent_plus",
        description="the 749 medical prompts of the co-authors' EM-inducing GRPO setting (chat rows)",
        url=f"{EMA_RL}/data/grpo/medical_750_train.jsonl",
        sha256="870c2718474fbbe9c2f7d9257ea3554afe82177ef69b4397a28c4cd3fd583b16"))
    # OpSwap (benign task, docs/methods.md#opswap): package-made, versioned so a changed definition gets new files.
    for tier in (1, 2, 3):
        for part in ("train", "test"):
            entries.append(Source(
                name=f"opswap_tier{tier}_{part}", filename=f"opswap/{opswap.VERSION}/tier{tier}_{part}.jsonl",
                licence="MIT (emalib)",
                description=f"OpSwap tier {tier}, {part} part of the 90/10 split (emalib's definition, seed 0)",
                generator=functools.partial(opswap.write_split, tier=tier, part=part)))
    return {entry.name: entry for entry in entries}


REGISTRY: dict[str, Source] = _build_registry()


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_sha(path: Path, source: Source) -> None:
    if source.sha256 is None:
        return
    actual = sha256_of(path)
    if actual != source.sha256:
        raise DataError(f"{path}: sha256 {actual} does not match the registry's {source.sha256} for "
                        f"'{source.name}' (a changed mirror or upstream file)")


def _download(source: Source, target: Path) -> None:
    if source.url is None:
        hint = f" (Hugging Face dataset {source.hf_dataset}; export it to {target})" if source.hf_dataset else ""
        raise DataError(f"{target}: data set '{source.name}' is not in the mirror or the cache and has no "
                        f"download URL{hint}")
    try:
        with urllib.request.urlopen(source.url, timeout=60) as response:
            raw = response.read()
    except OSError as err:
        raise DataError(f"{target}: could not download '{source.name}' from {source.url}: {err}. "
                        f"Set EMALIB_DATA_MIRROR to a folder holding {source.filename}") from None
    if source.postprocess is not None:
        raw = source.postprocess(raw)
    actual = hashlib.sha256(raw).hexdigest()
    if source.sha256 is not None and actual != source.sha256:
        # Checked before writing, so a bad download never lands in the cache.
        raise DataError(f"{source.url}: sha256 {actual} does not match the registry's {source.sha256} "
                        f"for '{source.name}'")
    atomic_write_bytes(target, raw)


def resolve(name_or_path: str) -> Path:
    """Return a local, checksum-verified path for a registry name, or the path itself if it is a file."""
    if name_or_path not in REGISTRY:
        path = Path(name_or_path)
        if path.suffix and not path.is_file():
            raise DataError(f"{path}: data file not found")
        if path.is_file():
            return path
        known = ", ".join(sorted(REGISTRY))
        raise DataError(f"{name_or_path}: not a file and not a registered data set (known: {known})")
    source = REGISTRY[name_or_path]
    cached = cache_dir() / "data" / source.filename
    if source.generator is not None:
        if not cached.is_file():
            source.generator(cached)
        return cached
    mirror = mirror_dir()
    if mirror is not None and (mirror / source.filename).is_file():
        path = mirror / source.filename
        _check_sha(path, source)
        return path
    if not cached.is_file():
        _download(source, cached)
    _check_sha(cached, source)
    return cached
