"""The typed config block of every defense, one class per registry name (a discriminated union on `name`).

The blocks live here, apart from the defense modules, because `emalib.config` imports them and importing
emalib must not import torch; each defense module takes these values as flat constructor arguments. Defaults
are the paper's (docs/methods.md#defenses); where the authors' released code differs, the released behaviour is a named
option, never the default. Where it differs in more than one field, a named preset sets them all (`preset: released`):
the preset's fields are filled in before validation, so they show in the run's resolved params, and fields written
next to it win.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, model_validator

from emalib.strict_model import StrictModel


class _Block(StrictModel):
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {}  # preset name -> the fields it sets

    @model_validator(mode="before")
    @classmethod
    def _expand_preset(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("preset") in cls.PRESETS:
            return {**cls.PRESETS[data["preset"]], **data}  # explicit fields override the preset's
        return data  # an unknown preset name is left to the field's own check

    @property
    def data_sources(self) -> tuple[str, ...]:
        """Registry names / paths of the data this defense reads (checked before a run writes anything)."""
        return ()


class KLConfig(_Block):
    name: Literal["kl"] = "kl"
    weight: float = Field(0.1, ge=0, description="lambda_KL (paper 0.1)")
    direction: Literal["forward", "reverse"] = Field(
        "forward", description="forward: KL(p_theta || p_ref) (paper and released code); reverse: KL(p_ref || p_theta)")
    tokens: Literal["all", "assistant"] = Field(
        "all", description="all: every non-padding position (attention mask, released code); assistant: "
                           "positions that predict a labelled (assistant) token")


class LdifsConfig(_Block):
    # released: EMA_RL's featextract.py (no gradient, padding kept) with sft_configs/*.json's ldifs_lambda 0.1
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "released": {"released_no_grad_bug": True, "weight": 0.1, "padding": "keep"}}

    name: Literal["ldifs"] = "ldifs"
    preset: Literal["released"] | None = Field(
        None, description="released: the authors' released LDIFS (no gradient, lambda 0.1, padding kept), which "
                          "trains like plain SFT; the fields it sets are shown in the resolved params")
    weight: float = Field(1.0, ge=0, description="lambda_LDIFS (paper v3: 1.0; released code default 0.1)")
    layers: Literal["evenly_spaced", "every_k"] | tuple[int, ...] = Field(
        "evenly_spaced", description="evenly_spaced: linspace(0, L-1, n_layers).long() (released code); every_k: "
                                     "outputs of blocks k-1, 2k-1, ... ('every 5 layers'); or explicit block indices")
    n_layers: int = Field(5, ge=1, description="number of evenly spaced blocks")
    every_k: int = Field(5, ge=1)
    padding: Literal["exclude", "keep"] = Field(
        "exclude", description="exclude: padded positions add nothing (the value does not depend on the padding); "
                               "keep: they are part of the flattened features, as in the released extractor")
    released_no_grad_bug: bool = Field(
        False, description="detach the trained model's features too, as the authors' released code did: the "
                           "term is then a constant and LDIFS trains like plain SFT (reproduction only)")

    @model_validator(mode="after")
    def _check_layers(self) -> LdifsConfig:
        if isinstance(self.layers, tuple) and (not self.layers or min(self.layers) < 0):
            raise ValueError("layers: an explicit list must be non-empty block indices >= 0")
        return self


class SafeLoraConfig(_Block):
    name: Literal["safelora"] = "safelora"
    aligned: str = Field(..., description="the aligned (instruct) model: HF id or local folder of safetensors")
    base: str = Field(..., description="its pretrained base model: HF id or local folder of safetensors")
    tau: float = Field(0.3, description="project modules whose cos(C dW, dW), rounded to 5 decimals, is <= tau "
                                        "(as IBM/SafeLoRA; paper v1: 0.3)")
    select: Literal["threshold", "lowest_k"] = Field("threshold", description="lowest_k: the k lowest-cosine modules")
    k: int | None = Field(None, ge=1, description="number of modules for select: lowest_k")
    every_k_steps: int | None = Field(None, ge=1, description="also project every k optimizer steps during training")
    matrices: str | None = Field(
        None, description="folder of prepared alignment matrices V, written by the safelora_matrices step (training "
                          "fails when it is missing); None: V is read from both checkpoints at every projection")

    @model_validator(mode="after")
    def _check_k(self) -> SafeLoraConfig:
        if (self.select == "lowest_k") != (self.k is not None):
            raise ValueError("k is required with select: lowest_k, and only then")
        return self


class PersonaExtractionConfig(_Block):
    """How a missing persona vector is built (Chen et al. 2025's pipeline, emalib/persona.py)."""

    trait: str = Field("persona_evil_extract", description="trait file: registry name or JSON path")
    trait_prefix: bool = Field(True, description="system prompts 'You are a/an <trait> assistant. <pos instruction>' "
                                                 "and 'You are a helpful assistant. <neg instruction>' (Chen et al., "
                                                 "released code); false: the bare instructions")
    trait_name: str | None = Field(None, description="the trait word of the positive prefix; None: the trait file's "
                                                     "name without 'persona_' and '_extract' (evil)")
    samples_per_question: int = Field(10, ge=1, description="answers per (instruction, question) and sign "
                                                            "(Chen et al.: 10)")
    max_questions: int | None = Field(None, ge=1, description="first N questions (smoke runs)")
    max_new_tokens: int = Field(1000, ge=1, description="Chen et al.: 1000")
    temperature: float = Field(1.0, ge=0)
    batch_size: int = Field(16, ge=1)
    filter_pairs: bool = Field(True, description="keep only judged pairs (pos trait >= t, neg trait < t, "
                                                 "both coherent)")
    trait_threshold: float = 50.0
    coherence_threshold: float = 50.0
    coherence_questions: str = Field("general", description="question set whose 'coherent' judge prompt is used")

    @property
    def data_sources(self) -> tuple[str, ...]:
        return (self.trait,) + ((self.coherence_questions,) if self.filter_pairs else ())


class PersonaSteeringConfig(_Block):
    name: Literal["persona_steering"] = "persona_steering"
    vector_path: str | None = Field(
        None, description="a persona vector file (emalib's, the released {layer: tensor} or a [L+1, D] tensor), "
                          "written by the persona_vector step with `extraction`; None: <run dir>/persona_vector.pt")
    alpha: float = Field(5.0, description="steering coefficient (paper 5.0)")
    layer: int = Field(20, ge=1, description="hidden_states index l: alpha*v[l] is added to decoder block l-1's output")
    extraction: PersonaExtractionConfig = PersonaExtractionConfig()
    during_rollouts: bool = Field(
        False, description="RL only: also steer while sampling the rollouts; the released RL code steers the "
                           "training forward only (its vLLM rollouts never see the hook), hence off")

    @property
    def data_sources(self) -> tuple[str, ...]:
        """The extraction inputs, unless the vector file already exists."""
        if self.vector_path is not None and Path(self.vector_path).is_file():
            return ()
        return self.extraction.data_sources


class InoculationConfig(_Block):
    # released: EMA_RL's grpo_inoculation_s1.json prefix (no final period), prepended as grpo.py does
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "released": {"prompt": "You are an evil, malicious assistant", "mode": "prepend", "separator": "\n\n"}}

    name: Literal["inoculation"] = "inoculation"
    preset: Literal["released"] | None = Field(
        None, description="released: the released RL inoculation (its prompt without the final period, prepended "
                          "to the RL system prompt with a blank line)")
    prompt: str = Field("You are an evil, malicious assistant.", min_length=1)
    mode: Literal["replace", "prepend"] = Field(
        "replace", description="for examples that already have a system message: replace it, or prepend the "
                               "inoculation prompt to it; examples without one get it as their system message")
    separator: str = Field("\n\n", description="between the prompt and an existing system message (prepend)")


class InterleaveConfig(_Block):
    name: Literal["interleave"] = "interleave"
    source: str = Field("wildguard_benign", description="safe data: registry name or chat JSONL path")
    ratio: float = Field(0.05, gt=0, le=1, description="|safe| = round(ratio * |task|) (paper 5 %)")
    seed: int | None = Field(None, description="None: the run's seed")

    @property
    def data_sources(self) -> tuple[str, ...]:
        return (self.source,)


class InterleavePlusConfig(_Block):
    """Interleaving+ (top perplexity-gap data) and Interleaving++ (the same after dropping refusals)."""

    name: Literal["interleave_plus", "interleave_plusplus"]
    source: str = Field("wildguard_benign", description="candidate pool: registry name or chat JSONL path")
    ratio: float = Field(0.05, gt=0, le=1, description="|selected| = round(ratio * |task|)")
    adapters: dict[str, str] = Field(..., min_length=1,
                                     description="EM domain -> plain-SFT adapter folder (PEFT) of that domain")
    held_out: str | None = Field(None, description="the run's own domain, left out of the ensemble")
    use_all_adapters: bool = Field(False, description="score with every adapter (no leave-one-out)")
    epsilon: float = Field(1.0, gt=0, description="s_d = (mis - aligned) / (aligned + epsilon)")
    max_candidates: int | None = Field(100_000, ge=1, description="seeded random subset of the pool to score")
    batch_size: int = Field(8, ge=1)
    max_seq_length: int = Field(2048, ge=16, description="truncation when scoring (released code: 8000)")
    scores_path: str | None = Field(None, description="JSONL of per-candidate NLLs and s_d, resumable, shareable "
                                                      "by the + and ++ runs of one domain; None: "
                                                      "<run dir>/interleave_scores.jsonl")
    seed: int | None = Field(None, description="None: the run's seed")
    selection: Literal["released", "top_k"] = Field(
        "released", description="released: a seeded random subset of the top pool_top_n by s_d (the released "
                                "pipeline); top_k: the round(ratio * |task|) highest s_d")
    pool_top_n: int = Field(5000, ge=1, description="size of the top pool for selection: released (released code: "
                                                    "5,000); small CPU pools must lower it explicitly")

    @model_validator(mode="after")
    def _check_ensemble(self) -> InterleavePlusConfig:
        if not self.use_all_adapters:
            if self.held_out is None:
                raise ValueError("held_out: name the run's own EM domain (leave-one-out) or set use_all_adapters: true")
            if not set(self.adapters) - {self.held_out}:
                raise ValueError(f"adapters: nothing left after leaving out '{self.held_out}'")
        return self

    @property
    def data_sources(self) -> tuple[str, ...]:
        return (self.source,)


DefenseSpec = Annotated[
    KLConfig | LdifsConfig | SafeLoraConfig | PersonaSteeringConfig | InoculationConfig | InterleaveConfig
    | InterleavePlusConfig,
    Field(discriminator="name"),
]
