"""The typed config block of every defense, one class per registry name (a discriminated union on `name`), and its
descriptor: what the rest of the package asks about the defense, as class attributes of the block (not params keys).
Everything else (the steps that prepare a defense, the defenses RL takes, a study's shared artifacts, the report's
method list, the cost model's extra forwards) is derived from these (docs/architecture.md#how-to-add-).

The blocks live here, apart from the defense modules, because `emalib.core.config` imports them and importing
emalib must not import torch; each defense module takes these values as flat constructor arguments. Defaults
are the paper's (docs/methods.md#defenses); where the authors' released code differs, the released behaviour is a named
option, never the default. Where it differs in more than one field, a named preset sets them all (`preset: released`):
the preset's fields are filled in before validation, so they show in the run's resolved params, and fields written
next to it win.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Union, get_args

from pydantic import Field, model_validator

from emalib.core.strict_model import StrictModel

# The steps that prepare a defense's artifact before training, in the order a run lists them.
PREPARATORY_STEPS = ("persona_vector", "safelora_matrices", "interleave_selection", "caft_directions")


@dataclass(frozen=True)
class Method:
    """A defense as the report names it: its label, the field that sets its strength, how the paper writes that
    strength and the strength of the paper's main tables (for a later method: its own paper's default). in_paper:
    whether the reproduced paper has it; the paper's tables lay out its rows always, a later method's only when a
    study planned or ran it."""

    label: str
    strength_field: str | None = None
    symbol: str = ""
    paper_strength: float | None = None
    in_paper: bool = True


class DefenseBlock(StrictModel):
    # The descriptor (class attributes): registry name -> how the report names it; the preparatory step that writes
    # the defense's artifact and the field naming that artifact (a study shares it between runs); whether the rl step
    # takes the defense; whether it adds a frozen-reference forward to each training step (the cost model).
    methods: ClassVar[dict[str, Method]] = {}
    prepared_by: ClassVar[str | None] = None
    artifact_field: ClassVar[str | None] = None
    in_rl: ClassVar[bool] = False
    reference_forward: ClassVar[bool] = False
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {}  # preset name -> the fields it sets

    @classmethod
    def registry_names(cls) -> tuple[str, ...]:
        return get_args(cls.model_fields["name"].annotation)

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


class KLConfig(DefenseBlock):
    methods: ClassVar[dict[str, Method]] = {"kl": Method("KL", "weight", "λ", 0.1)}
    reference_forward: ClassVar[bool] = True

    name: Literal["kl"] = "kl"
    weight: float = Field(0.1, ge=0, description="lambda_KL (paper 0.1)")
    direction: Literal["forward", "reverse"] = Field(
        "forward", description="forward: KL(p_theta || p_ref) (paper and released code); reverse: KL(p_ref || p_theta)")
    tokens: Literal["all", "assistant"] = Field(
        "all", description="all: every non-padding position (attention mask, released code); assistant: "
                           "positions that predict a labelled (assistant) token")


class KLRetainConfig(DefenseBlock):
    """KL on a retain set (Soligo et al. 2026): the KL term on interleaved aligned rows of other domains, which
    carry no task loss. Weights are per token; the released code's are per token divided by |V| (methods.md)."""

    methods: ClassVar[dict[str, Method]] = {"kl_retain": Method("KL (retain set)", "weight", "λ",
                                                                    in_paper=False)}
    reference_forward: ClassVar[bool] = True

    name: Literal["kl_retain"] = "kl_retain"
    weight: float = Field(0.1, ge=0, description="lambda per token (the released kl_weight divided by |V|)")
    direction: Literal["forward", "reverse"] = Field(
        "forward", description="forward: KL(p_theta || p_ref) as the kl defense; reverse: KL(p_ref || p_theta), "
                               "the released code's")
    tokens: Literal["all", "assistant"] = Field(
        "all", description="all: every non-padding position of a retain row (released code); assistant: its "
                           "positions that predict a response token")
    source: str = Field("wildguard_benign", description="retain data: registry name or chat JSONL path (the paper: "
                                                        "aligned advice of other domains)")
    ratio: float = Field(1.0, gt=0, description="|retain| = round(ratio * |task|), shuffled into the task data")
    seed: int | None = Field(None, description="None: the run's seed")

    @property
    def data_sources(self) -> tuple[str, ...]:
        return (self.source,)


class LdifsConfig(DefenseBlock):
    methods: ClassVar[dict[str, Method]] = {"ldifs": Method("LDIFS", "weight", "λ", 1.0)}
    reference_forward: ClassVar[bool] = True
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


class SafeLoraConfig(DefenseBlock):
    methods: ClassVar[dict[str, Method]] = {"safelora": Method("SafeLoRA", "tau", "τ", 0.3)}
    prepared_by: ClassVar[str | None] = "safelora_matrices"
    artifact_field: ClassVar[str | None] = "matrices"

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


class PersonaExtractionConfig(DefenseBlock):
    """How a missing persona vector is built (Chen et al. 2025's pipeline, emalib/evaluation/persona.py)."""

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


class PersonaSteeringConfig(DefenseBlock):
    methods: ClassVar[dict[str, Method]] = {"persona_steering": Method("Persona vector", "alpha", "α", 5.0)}
    prepared_by: ClassVar[str | None] = "persona_vector"
    artifact_field: ClassVar[str | None] = "vector_path"
    in_rl: ClassVar[bool] = True

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


class InoculationConfig(DefenseBlock):
    methods: ClassVar[dict[str, Method]] = {"inoculation": Method("Inoculation prompt")}
    in_rl: ClassVar[bool] = True
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


class InterleaveConfig(DefenseBlock):
    methods: ClassVar[dict[str, Method]] = {"interleave": Method("Interleaving", "ratio", "ratio", 0.05)}

    name: Literal["interleave"] = "interleave"
    source: str = Field("wildguard_benign", description="safe data: registry name or chat JSONL path")
    ratio: float = Field(0.05, gt=0, le=1, description="|safe| = round(ratio * |task|) (paper 5 %)")
    seed: int | None = Field(None, description="None: the run's seed")

    @property
    def data_sources(self) -> tuple[str, ...]:
        return (self.source,)


class InterleavePlusConfig(DefenseBlock):
    """Interleaving+ (top perplexity-gap data) and Interleaving++ (the same after dropping refusals)."""

    methods: ClassVar[dict[str, Method]] = {"interleave_plus": Method("Interleaving+", "ratio", "ratio", 0.05),
                                            "interleave_plusplus": Method("Interleaving++", "ratio", "ratio", 0.05)}
    prepared_by: ClassVar[str | None] = "interleave_selection"
    artifact_field: ClassVar[str | None] = "scores_path"

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


class TreftConfig(DefenseBlock):
    """TReFT (Zhao et al., arXiv 2606.06667): lambda * the relative drift of the template tokens' keys and values."""

    methods: ClassVar[dict[str, Method]] = {"treft": Method("TReFT", "weight", "λ", 10.0, in_paper=False)}

    name: Literal["treft"] = "treft"
    weight: float = Field(10.0, ge=0, description="lambda (paper Table 15, Qwen2.5-7B: finance 10, health 10, "
                                                  "legal 30, auto 30; released config 10)")
    region: Literal["prefix", "postfix"] = Field(
        "prefix", description="prefix: the template tokens before the user's content (system block + user header); "
                              "postfix: those between the user's and the assistant's content (thinking models)")
    variant: Literal["paper", "released"] = Field(
        "paper", description="paper: the keys/values caught at k_proj/v_proj, each row's own region; released: "
                             "k_proj/v_proj of hidden_states[l] (no input norm) at positions [:, :k] of every row")
    drift_threshold: float = Field(0.0, ge=0, description="tau of the released hinge max(lambda * L_KV - tau, 0) "
                                                          "(released configs 0, its schema default 0.1)")


class CaftConfig(DefenseBlock):
    """Concept ablation fine-tuning (Casademunt et al. 2025): directions projected out of the residual stream at
    decoder block outputs during the training forward only."""

    methods: ClassVar[dict[str, Method]] = {"caft": Method("CAFT", in_paper=False)}
    prepared_by: ClassVar[str | None] = "caft_directions"
    artifact_field: ClassVar[str | None] = "directions_path"

    name: Literal["caft"] = "caft"
    layers: tuple[int, ...] = Field(..., min_length=1, description="decoder block indices b: the directions are "
                                                                   "removed from block b's output (hidden_states "
                                                                   "b+1), as the released model.layers[b] hook")
    select: Literal["hand", "persona", "all", "persona_vector"] = Field(
        "hand", description="hand: `components` per layer (the paper's hand-picked PCs); persona: the k directions "
                            "with the largest |cosine| with the persona vector; all: every direction in the file; "
                            "persona_vector: the persona vector itself (no directions file)")
    directions_path: str | None = Field(
        None, description="torch file {'directions': {layer: [n, hidden]}}: given, or written by the "
                          "caft_directions step from `adapter` (None then: <run dir>/caft_directions.pt)")
    adapter: str | None = Field(None, description="a plain fine-tune's adapter folder (PEFT): the caft_directions "
                                                  "step takes PCs of its minus the base model's block outputs")
    prompts: str = Field("alpaca_500", description="caft_directions: neutral chat data whose response tokens the "
                                                   "activations are taken on (registry name or chat JSONL path)")
    max_prompts: int | None = Field(200, ge=1, description="caft_directions: first N conversations (seeded shuffle)")
    n_components: int = Field(20, ge=1, description="caft_directions: PCs kept per layer (released: 20)")
    batch_size: int = Field(8, ge=1, description="caft_directions: conversations per forward")
    components: dict[int, tuple[int, ...]] | None = Field(
        None, description="select: hand: layer -> row indices of the directions file (as the released "
                          "interpreted_pcs.json)")
    k: int = Field(2, ge=1, description="select: persona: directions kept per layer")
    persona_vector_path: str | None = Field(None, description="a persona vector file (select: persona or "
                                                              "persona_vector)")

    @model_validator(mode="after")
    def _check_sources(self) -> CaftConfig:
        if min(self.layers) < 0:
            raise ValueError("layers: decoder block indices must be >= 0")
        if self.select != "persona_vector" and self.directions_path is None and self.adapter is None:
            raise ValueError(f"directions_path or adapter (the caft_directions step) is required with select: "
                             f"{self.select}")
        if self.select in ("persona", "persona_vector") and self.persona_vector_path is None:
            raise ValueError(f"persona_vector_path is required with select: {self.select}")
        if (self.select == "hand") != (self.components is not None):
            raise ValueError("components is required with select: hand, and only then")
        if self.components is not None:
            if set(self.components) != set(self.layers):
                raise ValueError(f"components: its layers {sorted(self.components)} must be the layers "
                                 f"{sorted(self.layers)}")
            if any(not picked or min(picked) < 0 for picked in self.components.values()):
                raise ValueError("components: each layer needs a non-empty list of indices >= 0")
        return self

    @property
    def data_sources(self) -> tuple[str, ...]:
        """The neutral prompts, when the directions are still to be computed from the adapter."""
        if self.adapter is None or self.select == "persona_vector" or (
                self.directions_path is not None and Path(self.directions_path).is_file()):
            return ()
        return (self.prompts,)


class EarlyStoppingConfig(DefenseBlock):
    """Early stopping (Schreiber & Goldstein 2026, "Overtrained, Not Misaligned"): keep the checkpoint of lowest
    in-domain validation loss, stop `patience` evaluations after it (docs/methods.md#early-stopping)."""

    methods: ClassVar[dict[str, Method]] = {"early_stopping": Method("Early stopping", "patience", "patience",
                                                                         in_paper=False)}

    name: Literal["early_stopping"] = "early_stopping"
    patience: int = Field(3, ge=1, description="evaluations without improvement before training stops")
    eval_every: int = Field(20, ge=1, description="optimizer steps between validation-loss evaluations (each one "
                                                  "is also a checkpoint, replacing train.save_steps)")
    metric: Literal["val_loss"] = Field("val_loss", description="the task cross-entropy on the validation split")
    min_delta: float = Field(0.0, ge=0, description="a smaller decrease does not count as an improvement")
    validation_fraction: float = Field(0.1, gt=0, lt=1, description="seeded share of the training data kept out "
                                                                    "of training for validation")
    validation_dataset: str | None = Field(
        None, description="a chat JSONL (registry name or path) to validate on instead; None: the seeded split")
    seed: int | None = Field(None, description="seed of the validation split; None: the run's seed")
    eval_batch_size: int | None = Field(None, ge=1, description="None: train.per_device_batch_size")

    @property
    def data_sources(self) -> tuple[str, ...]:
        return (self.validation_dataset,) if self.validation_dataset else ()


# Every defense's block, in the paper's table order; the params' `defenses` entries are one of these, by `name`.
# A defense defined outside this module adds its block with emalib.defenses.registry.register_defense.
DEFENSE_BLOCKS: list[type[DefenseBlock]] = [KLConfig, LdifsConfig, SafeLoraConfig, PersonaSteeringConfig,
                                            InoculationConfig, InterleaveConfig, InterleavePlusConfig,
                                            TreftConfig, KLRetainConfig, CaftConfig, EarlyStoppingConfig]


def defense_union(blocks=None):
    """The type of one `defenses` entry: one of the blocks, chosen by its `name`."""
    return Annotated[Union[tuple(blocks or DEFENSE_BLOCKS)], Field(discriminator="name")]  # noqa: UP007


DefenseSpec = defense_union()


def add_defense_block(block: type[DefenseBlock]) -> None:
    taken = set(defense_names()) & set(block.registry_names())
    if taken:
        raise ValueError(f"defense {', '.join(sorted(taken))} already has a config block")
    missing = [name for name in block.registry_names() if name not in block.methods]
    if missing:
        raise ValueError(f"{block.__name__}.methods: no label for {', '.join(missing)}")
    DEFENSE_BLOCKS.append(block)


def block_of(name: str) -> type[DefenseBlock]:
    """The config block class of a defense's registry name."""
    return next(block for block in DEFENSE_BLOCKS if name in block.registry_names())


def defense_names() -> tuple[str, ...]:
    return tuple(name for block in DEFENSE_BLOCKS for name in block.registry_names())


def defense_methods() -> dict[str, Method]:
    """Registry name -> how the report names the defense, in the paper's table order."""
    return {name: method for block in DEFENSE_BLOCKS for name, method in block.methods.items()}


def _preparing_blocks() -> list[type[DefenseBlock]]:
    """The blocks with a preparatory step, in the order of PREPARATORY_STEPS."""
    blocks = [block for block in DEFENSE_BLOCKS if block.prepared_by is not None]
    return sorted(blocks, key=lambda block: PREPARATORY_STEPS.index(block.prepared_by))


def prepared_by() -> dict[str, tuple[str, ...]]:
    """Preparatory step -> the defenses whose artifact it writes."""
    steps: dict[str, tuple[str, ...]] = {}
    for block in _preparing_blocks():
        steps[block.prepared_by] = steps.get(block.prepared_by, ()) + block.registry_names()
    return steps


def shared_artifacts() -> dict[str, tuple[tuple[str, ...], str]]:
    """Preparatory step -> (its defenses, the block field naming the artifact it writes)."""
    return {block.prepared_by: (block.registry_names(), block.artifact_field) for block in _preparing_blocks()
            if block.artifact_field is not None}


def rl_defenses() -> tuple[str, ...]:
    """The defenses the rl step takes (the others have an RL form in the rl block: KL is rl.beta, interleaving
    rl.sft_mix)."""
    return tuple(name for block in DEFENSE_BLOCKS if block.in_rl for name in block.registry_names())


def reference_forward_defenses() -> frozenset[str]:
    return frozenset(name for block in DEFENSE_BLOCKS if block.reference_forward for name in block.registry_names())
