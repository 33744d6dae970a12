"""Hugging Face transformers: train a causal LM with any crossent loss, without its logits.

    import crossent.integrations.transformers as xt

    xt.apply(model, loss="focal")                 # a loaded *ForCausalLM, patched in place
    out = model(input_ids, labels=labels)          # training: out.loss, out.logits is None
    out.loss.backward()

One mechanism for every family (:mod:`._families`): in training, a forward given ``labels`` runs as
it stands, except that the head module computes the loss with :func:`crossent.linear_cross_entropy`
from its input and its own weight (inside the head's forward, so FSDP and DeepSpeed ZeRO-3 gather
that weight as for the stock head), with the family's logit post-processing (soft-capping, scaling)
read from the config, and returns a probe instead of ``[B, T, V]`` logits; ``loss_function`` returns
that loss after checking that the forward post-processed the probe as the config says. The loss has
the stock semantics: the causal shift (or the given ``shift_labels``), ``ignore_index``,
``num_items_in_batch`` (the sum divided by it, as transformers' ``fixed_cross_entropy``),
``logits_to_keep``, tied embeddings, a float32 loss.

The mode does not choose the path: given ``labels``, the loss is fused in training and in eval mode
alike (``from_pretrained`` returns a model in eval mode; ``train()``/``eval()`` switch dropout as
usual). Without labels, or with ``return_logits=True``, the stock forward runs with its logits;
given labels, the loss is then the same crossent loss evaluated on those logits.
``return_token_stats=True`` puts the fused pass's per-token statistics on the output (:class:`TokenStats`).

``apply(trainer)`` patches a ``transformers.Trainer``'s or a TRL trainer's model and takes over what
would compute a loss from logits (label smoothing; TRL SFTTrainer's fused LM head, served by one
crossent pass); TRL trainers with objectives of their own (DPO, GRPO, GKD) refuse another loss. A
patched instance whose forward is later replaced by one that computes its own loss is refused at its
first forward given labels (forward hooks see that the patch did not run).
``transformers`` is imported only by the functions that need it.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import sys
import warnings
import weakref
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._functional import cross_entropy
from .._linear import linear_cross_entropy
from .._linear_call import resolve_options
from ..losses import CrossEntropy, Transformed
from ..losses._build import build_loss
from ._families import FAMILIES, LogitMap, UnsupportedModel, check_post_processing, logit_map, probe, register_family
from ._heads import check_linear_head, head_weights

__all__ = ["FAMILIES", "TokenStats", "UnsupportedModel", "apply", "is_patched", "patched", "register_family", "undo"]

#: Keyword arguments of :func:`apply` that configure the loss (those of ``linear_cross_entropy``).
LOSS_OPTIONS = ("weight", "label_smoothing", "z_loss", "backend", "chunk_size", "accum_dtype", "options")

#: Arguments of ``linear_cross_entropy`` that the patched forward sets itself, and where they come from.
_SET_BY_THE_FORWARD = {
    "shift": "the causal shift is the model's (or pass shift_labels to the forward)",
    "ignore_index": "the forward's ignore_index keyword (default -100) is used",
    "reduction": "the model's loss is the mean, or the sum over num_items_in_batch",
    "normalizer": "pass num_items_in_batch to the forward",
    "sample_weight": "pass sample_weight to the forward",
    "softcap": "the head's own soft-capping comes from the config; add a transform to the loss for another",
    "bias": "the head's bias is used",
    "return_stats": "pass return_token_stats=True to the forward: the output's token_stats holds them",
}


class _Settings:
    """What :func:`apply` was given: the loss object and the engine options."""

    def __init__(self, loss, options: dict):
        unknown = [k for k in options if k not in LOSS_OPTIONS]
        if unknown:
            why = [f"{k}: {_SET_BY_THE_FORWARD[k]}" for k in unknown if k in _SET_BY_THE_FORWARD]
            hyperparameters = [k for k in unknown if k not in _SET_BY_THE_FORWARD]
            if hyperparameters:
                # Most likely a loss's own hyperparameter (gamma of "focal"): it belongs to the loss object.
                name = loss if isinstance(loss, str) else "focal"
                given = ", ".join(f"{k}={options[k]!r}" for k in hyperparameters)
                why.append(
                    f"a loss's hyperparameters go into the loss object: "
                    f"apply(model, loss=crossent.losses.get({name!r}, {given}))"
                )
            raise TypeError(f"apply() got unexpected options {unknown}; it takes {LOSS_OPTIONS} ({'; '.join(why)})")
        self.loss = build_loss(
            loss, label_smoothing=options.get("label_smoothing", 0.0), z_loss=options.get("z_loss", 0.0)
        )
        weight = options.get("weight")
        if weight is not None and (not isinstance(weight, Tensor) or weight.dim() != 1):
            raise TypeError(f"weight must be a 1-D tensor of class weights, got {type(weight).__name__}")
        self.weight = weight
        self.engine = resolve_options(
            options.get("options"), backend=options.get("backend", "auto"), chunk_size=options.get("chunk_size"),
            accum_dtype=options.get("accum_dtype"),
        )  # fmt: skip
        #: ``(scale, softcap)`` of a head's post-processing -> the loss with those transforms (:meth:`loss_for`).
        self.transformed: dict[tuple, object] = {}
        #: The loss is the stock one (plain cross-entropy, no class weights): a trainer that computes
        #: cross-entropy its own way (TRL's fused LM head) trains what was asked for.
        self.default = type(self.loss) is CrossEntropy and not self.loss.label_smoothing and weight is None
        #: Set by apply(trainer) for TRL's SFTTrainer: the forward serves its fused-head calls itself.
        self.serves_trl_sft = False

    def loss_for(self, logit_map: LogitMap):
        """The loss with ``logit_map`` as its transforms, built once per map and kept: ``torch.compile``
        takes a loss object only if it was built outside the compiled code (every forward after the first
        finds it here, and a compiled forward never builds one)."""
        key = (logit_map.scale, logit_map.softcap)
        if key == (1.0, None):  # a plain head: the loss itself, nothing to build (a patched class compiles)
            return self.loss
        loss = self.transformed.get(key)
        if loss is not None:
            return loss
        if torch.compiler.is_compiling():
            raise UnsupportedModel(
                f"under torch.compile, the head's post-processing {logit_map} has no loss built for it (the loss "
                "is built when apply() patches a model, and at a forward outside torch.compile); patch the model "
                "rather than its class, or run one training forward before compiling"
            )
        transforms = logit_map.transforms()
        loss = Transformed(self.loss, *transforms) if transforms else self.loss
        self.transformed[key] = loss
        return loss

    def prebuild(self, cls: type) -> None:
        """Build the loss of the post-processing that ``cls``'s default config implies (Gemma 2's
        soft-capping), so that an instance of a patched class compiled before any eager forward finds it
        built. An instance whose config differs builds its own at its first forward outside torch.compile."""
        try:
            config = cls.config_class()
            default = logit_map(config.model_type, config, cls.__name__)
        except Exception:  # noqa: BLE001 - no usable default config: the instance's forward decides
            return
        self.loss_for(default)

    def check(self, who: str, model: nn.Module | None = None) -> None:
        """Refuse now what would fail in training. A loss that reads ``extra`` on every call is refused
        (the forward has none to give). Given the model, the fused call itself runs on 'meta' tensors of
        its vocabulary size (they hold no data: nothing is computed), so that every check of the call
        (class weights, loss, options) fails at :func:`apply` rather than at the first training forward."""
        needed = self.loss.extra_inputs()
        if needed:
            raise ValueError(
                f"{who}: the loss {self.loss!r} reads {', '.join(f'extra[{k!r}]' for k in needed)} on every call, "
                "which the model's forward cannot pass; call crossent.linear_cross_entropy(hidden, "
                "model.get_output_embeddings().weight, labels, shift=True, loss=..., "
                f"extra={{{', '.join(f'{k!r}: ...' for k in needed)}}}) yourself, with hidden the last of the "
                "forward's hidden_states (output_hidden_states=True)"
            )
        if model is None:
            return
        config = model.config
        # The head's rows, which the call reads (a partitioned weight keeps its out_features); else the config's.
        num_classes = getattr(model.get_output_embeddings(), "out_features", None) or config.vocab_size
        vocabulary = torch.empty(num_classes, 1, device="meta")
        loss = self.loss_for(logit_map(config.model_type, config, who))
        # accum_dtype is checked against the dtype the products run in, which autocast may change: at the call.
        options = self.engine.replace(accum_dtype=None)
        row = torch.empty(1, 1, device="meta")
        target = torch.zeros(1, dtype=torch.long, device="meta")
        linear_cross_entropy(row, vocabulary, target, loss=loss, weight=self.weight, options=options)


# -- patching ------------------------------------------------------------------------------------------------

#: Patched classes -> (settings, the forward in the class's own namespace before, or None).
_CLASSES: dict = {}
#: Models whose patched forward is running (a nested patched forward runs unpatched).
_ACTIVE: weakref.WeakSet = weakref.WeakSet()
#: Models whose post-processing was checked, with the map that was checked.
_CHECKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def apply(model, loss="ce", **options):
    """Patch a transformers causal LM (or a class of them) to train with a crossent loss, without logits.

    Args:
        model: a loaded ``*ForCausalLM`` or ``*ForConditionalGeneration`` (also wrapped by PEFT), patched
            in place; or a class such as ``transformers.LlamaForCausalLM``, patched for every instance
            (also those created later); or a ``transformers.Trainer``, whose model is patched and whose
            ``label_smoothing_factor`` becomes the loss's ``label_smoothing`` (the Trainer then passes
            the labels to the model).
        loss: a registered crossent loss name or a :class:`crossent.losses.Loss`.
        **options: ``weight`` (class weights), ``label_smoothing``, ``z_loss``, and the engine's
            ``backend``, ``chunk_size``, ``accum_dtype``, ``options``, as in
            :func:`crossent.linear_cross_entropy`.

    Returns:
        ``model``. Applying again replaces the loss and options.

    Raises:
        TypeError: an Auto class (``AutoModelForCausalLM``: apply the model it loads), or a class that is
            not a transformers model class.
        UnsupportedModel: a model without a language-model head (a base model, as ``AutoModel`` loads),
            a head that is not a linear layer, an encoder-decoder model, post-processing of the logits
            that crossent cannot reproduce. Any other family is accepted, its post-processing read from
            its config; the first training forward refuses it if its head does something else.

    The patched forward takes two more keyword arguments: ``sample_weight`` (a float per label,
    shaped like ``labels``, or like ``shift_labels`` when given, multiplying each token's loss) and
    ``return_logits=True`` (run the stock head: the logits are returned, the loss is the same crossent
    loss computed from them). Given labels, the loss is fused in eval mode too.

    A loss's own hyperparameters go into the loss object, not into ``**options``:
    ``apply(model, loss=crossent.losses.get("focal", gamma=3.0))``.
    """
    if _is_trainer(model):
        return _apply_to_trainer(model, loss, options)
    settings = _Settings(loss, options)
    if isinstance(model, type):
        _check_class(model)
        settings.check(model.__name__)
        settings.prebuild(model)
        if model not in _CLASSES:
            _CLASSES[model] = (settings, model.__dict__.get("forward"))
            model.forward = _class_forward(model, model.forward)
        else:
            _CLASSES[model] = (settings, _CLASSES[model][1])
        return model
    target = _causal_lm(model)
    _check_family(target.config.model_type, target.config, type(target).__name__)
    _check_head(target)
    settings.check(type(target).__name__, target)
    patch = _instance_patch(target)
    if patch is not None:
        patch.settings = settings
        return model
    patch = target.forward = _PatchedForward(target, settings, target.__dict__.get("forward"))
    guard = _guard_of(target)
    if guard is None:
        guard = _ReplacedForwardGuard(patch)
        target.register_forward_pre_hook(guard.before, with_kwargs=True)
        target.register_forward_hook(guard.after, with_kwargs=True)
    else:
        guard.patch = patch
    return model


def _is_trainer(obj) -> bool:
    """Whether ``obj`` is a ``transformers.Trainer`` (or a subclass), without importing transformers."""
    return not isinstance(obj, type) and any(
        cls.__name__ == "Trainer" and cls.__module__.startswith("transformers.") for cls in type(obj).__mro__
    )


def _apply_to_trainer(trainer, loss, options: dict):
    """:func:`apply` to a Trainer's model, taking over the Trainer's own label smoothing. The Trainer pops
    the labels when it smooths them itself and applies its ``LabelSmoother`` to the full logits; the
    same smoothed cross-entropy (``(1 - eps) * nll + eps * mean(-log p)``, over the counted tokens or
    ``num_items_in_batch``) is crossent's ``label_smoothing``, computed fused once the labels reach the model.

    TRL's trainers install their own fused LM head on the model (``fused_lm_head=True`` calls). For
    ``SFTTrainer`` the patched forward serves those calls: the per-token losses, entropy and top-1 flags
    come from one crossent pass. The others (DPO, GRPO, GKD, ...) compute their own objective from the
    model's log-probabilities or logits: they are refused unless the loss is the default cross-entropy."""
    name = type(trainer).__name__
    sft = _trl_sft(trainer)
    if sft is None and _is_trl(trainer):
        if not _Settings(loss, options).default:
            raise ValueError(_refusal(name, loss))
    liger = getattr(getattr(trainer, "args", None), "use_liger_kernel", False)
    if liger and (getattr(trainer.args, "liger_kernel_config", None) or {}).get("fused_linear_cross_entropy", True):
        raise ValueError(
            f"apply(trainer): {name} has use_liger_kernel=True, whose fused linear cross-entropy replaces the "
            "model's forward when training starts and computes its own loss in place of the crossent loss; keep "
            "Liger's other kernels with liger_kernel_config={'fused_linear_cross_entropy': False}"
        )
    if sft is not None and getattr(trainer.args, "loss_type", "nll") != "nll" and not _Settings(loss, options).default:
        raise ValueError(
            f"apply(trainer): {name} has loss_type={trainer.args.loss_type!r}, which reweighs the per-token "
            "log-probabilities; with a crossent loss other than the default cross-entropy the trainer would read "
            "per-token losses as log-probabilities. Use loss_type='nll'"
        )
    if getattr(trainer, "compute_loss_func", None) is not None:
        raise ValueError(
            "apply(trainer): the Trainer has a compute_loss_func, which computes the loss from the logits "
            "in place of the crossent loss; build the Trainer without it"
        )
    smoother = getattr(trainer, "label_smoother", None)
    if smoother is not None:
        if getattr(smoother, "ignore_index", -100) != -100:
            raise ValueError(f"apply(trainer): the Trainer's LabelSmoother ignores {smoother.ignore_index}, not -100")
        given = options.get("label_smoothing")
        if given is not None and given != smoother.epsilon:
            raise ValueError(
                f"apply(trainer, label_smoothing={given}): the Trainer's label_smoothing_factor is "
                f"{smoother.epsilon}; give one of them"
            )
        options = {**options, "label_smoothing": smoother.epsilon}
    apply(trainer.model, loss, **options)
    trainer.label_smoother = None  # the model smooths: the Trainer keeps the labels in the inputs
    if sft is not None:
        _settings_of(_causal_lm(trainer.model)).serves_trl_sft = True
    return trainer


def _is_trl(obj) -> bool:
    return any(cls.__module__.startswith("trl.") for cls in type(obj).__mro__)


def _trl_sft(trainer):
    """TRL's ``SFTTrainer`` class when ``trainer`` is one whose loss is SFTTrainer's own (not GKD's, which
    subclasses it with a distillation loss computed from logits), else None."""
    for cls in type(trainer).__mro__:
        if cls.__name__ == "SFTTrainer" and cls.__module__.startswith("trl."):
            return cls if type(trainer).compute_loss is cls.compute_loss else None
    return None


def _calling_trainer():
    """The ``transformers.Trainer`` whose method is on the call stack (for naming it in an error), or None."""
    frame = sys._getframe(1)
    while frame is not None:
        owner = frame.f_locals.get("self")
        if owner is not None and _is_trainer(owner):
            return owner
        frame = frame.f_back
    return None


def _refusal(trainer_name: str, loss, what: str = "") -> str:
    """Why a TRL trainer other than SFTTrainer cannot train a crossent loss, and where to go instead."""
    return (
        f"{trainer_name} computes its own objective from the model's log-probabilities or logits{what}, so the "
        f"crossent loss {loss!r} given to apply() would not be trained. crossent's preference and RL objectives "
        "(docs/rl.md) and distillation losses (docs/distillation.md) compute such objectives without logits; "
        "to run this trainer, undo the patch or apply the default loss (loss='ce'). SFTTrainer is supported: "
        "apply(trainer, loss=...)"
    )


class _ReplacedForwardGuard:
    """Forward hooks of a patched instance that refuse a call given labels in which the patch did not run:
    a forward set over it after :func:`apply` computed the loss itself (TRL's fused LM head, Liger's fused
    linear cross-entropy), which would train its own cross-entropy in place of the crossent loss. A
    wrapper that calls the patch (accelerate's mixed-precision forward) passes. The default loss lets any
    forward run (it is the loss they compute). Hooks, not part of the forward: they run around whatever
    forward the instance holds."""

    def __init__(self, patch: _PatchedForward):
        self.patch = patch
        self.started: list[int | None] = []

    # Under torch.compile the hooks do nothing: their bookkeeping would break the graph.
    def before(self, model, args, kwargs):
        if torch.compiler.is_compiling():
            return
        labelled = kwargs.get("labels") is not None and not self.patch.settings.default
        self.started.append(self.patch.calls if labelled else None)

    def after(self, model, args, kwargs, output):
        if torch.compiler.is_compiling():
            return None
        started = self.started.pop() if self.started else None
        if started is None or self.patch.calls != started or self.patch.model is not model:
            return None
        settings = self.patch.settings
        trainer = _calling_trainer()
        forward = model.__dict__.get("forward")
        code = getattr(getattr(forward, "__func__", forward), "__code__", None)
        by = f"{code.co_qualname} of {code.co_filename.rsplit('site-packages/', 1)[-1]}" if code else repr(forward)
        why = (
            f"{type(model).__name__}: its forward was replaced after crossent's apply() by {by}, which computed "
            "the loss itself"
        )
        if trainer is not None and _trl_sft(trainer) is not None:
            why += (
                f", in place of the crossent loss {settings.loss!r}: call "
                "crossent.integrations.transformers.apply(trainer, loss=...) once the trainer is built"
            )
        elif trainer is not None and _is_trl(trainer):
            why += "; " + _refusal(type(trainer).__name__, settings.loss)
        else:
            why += f", in place of the crossent loss {settings.loss!r}; apply() the model after whatever replaced it"
        raise UnsupportedModel(why)


def _guard_of(model: nn.Module) -> _ReplacedForwardGuard | None:
    hooks = (getattr(h, "__self__", None) for h in model._forward_pre_hooks.values())
    return next((h for h in hooks if isinstance(h, _ReplacedForwardGuard)), None)


def _remove_guard(model: nn.Module) -> None:
    for hooks, kwargs in (
        (model._forward_pre_hooks, model._forward_pre_hooks_with_kwargs),
        (model._forward_hooks, model._forward_hooks_with_kwargs),
    ):
        for key, hook in list(hooks.items()):
            if isinstance(getattr(hook, "__self__", None), _ReplacedForwardGuard):
                del hooks[key]
                kwargs.pop(key, None)


def undo(model) -> None:
    """Remove the patch of :func:`apply` from a model or a class (and from instances of a patched class)."""
    if isinstance(model, type):
        if model not in _CLASSES:
            raise ValueError(f"{model.__name__} is not patched")
        _, before = _CLASSES.pop(model)
        if before is None:
            del model.forward
        else:
            model.forward = before
        return
    target = _causal_lm(model)
    patch = _instance_patch(target)
    if patch is None:
        raise ValueError(f"{type(target).__name__} is not patched (for a patched class, undo the class)")
    if patch.before is None:
        del target.forward
    else:
        target.forward = patch.before
    _remove_guard(target)
    _CHECKED.pop(target, None)


def is_patched(model) -> bool:
    """Whether :func:`apply` patched this model (directly or through its class) or this class."""
    if isinstance(model, type):
        return model in _CLASSES
    target = _causal_lm(model)
    return _instance_patch(target) is not None or any(isinstance(target, cls) for cls in _CLASSES)


@contextlib.contextmanager
def patched(model, loss="ce", **options):
    """:func:`apply` for the duration of a ``with`` block, then :func:`undo`; yields ``model``."""
    already = is_patched(model) and (isinstance(model, type) or _instance_patch(_causal_lm(model)) is not None)
    if already:
        raise ValueError("the model is already patched; undo it first or use apply() to change the loss")
    apply(model, loss, **options)
    try:
        yield model
    finally:
        undo(model)


def _causal_lm(model) -> nn.Module:
    """The transformers model behind a PEFT wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    target = get_base() if callable(get_base) and type(model).__module__.startswith("peft.") else model
    if (
        not isinstance(target, nn.Module)
        or not hasattr(target, "config")
        or not hasattr(target, "get_output_embeddings")
    ):
        raise TypeError(f"apply() takes a transformers causal LM (or a PEFT model of one), got {type(model).__name__}")
    return target


def _check_class(cls: type) -> None:
    """Refuse, by name, a class that is not a transformers model class with a config (an Auto class)."""
    config_class = getattr(cls, "config_class", None)
    if not isinstance(getattr(config_class, "model_type", None), str):
        factory = "an Auto class, which makes models of many classes" if cls.__name__.startswith("Auto") else (
            "not a transformers model class (it has no config_class with a model_type)"
        )  # fmt: skip
        raise TypeError(
            f"apply() takes a transformers causal LM, an instance or its class; {cls.__name__} is {factory}: "
            "apply the model it loads (model = AutoModelForCausalLM.from_pretrained(...); xt.apply(model)) "
            "or its class (xt.apply(type(model)))"
        )
    _check_family(config_class.model_type, None, cls.__name__)


def _check_family(model_type: str, config, who: str) -> None:
    """Refuse, by name, what crossent cannot reproduce: encoder-decoder models, post-processing it does not
    know. Any other family is accepted; its first patched forward checks that crossent reproduces its head."""
    if config is not None and getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModel(
            f"{who}: encoder-decoder models are not supported (their loss does not shift the labels)"
        )
    logit_map(model_type, config, who)


def _check_head(model: nn.Module) -> None:
    """Refuse, by name, a model without a language-model head (a base model, as ``AutoModel`` loads) or
    with one that is not a linear layer."""
    who = type(model).__name__
    head = model.get_output_embeddings()
    if head is None:
        raise UnsupportedModel(
            f"{who} has no language-model head (get_output_embeddings() is None): it computes no loss from "
            "labels; load the causal LM of the checkpoint (AutoModelForCausalLM.from_pretrained) and apply that"
        )
    check_linear_head(head, who)


def _settings_of(model) -> _Settings:
    patch = _instance_patch(model)
    if patch is not None:
        return patch.settings
    for cls in type(model).__mro__:
        if cls in _CLASSES:
            return _CLASSES[cls][0]
    raise RuntimeError(f"{type(model).__name__} is not patched")


def _instance_patch(model) -> _PatchedForward | None:
    """The patch :func:`apply` put on this instance, if any."""
    patch = model.__dict__.get("forward")
    return patch if isinstance(patch, _PatchedForward) and patch.model is model else None


class _PatchedForward:
    """The forward :func:`apply` sets on a patched instance. The patch (its settings, the forward it
    replaced) lives here, in the instance's ``__dict__``, rather than in a registry: ``copy.deepcopy``
    (reference models, EMA) and pickling (``torch.save``) then carry it, and the copy is a patched model
    with the same loss and options, bound to itself."""

    def __init__(self, model: nn.Module, settings: _Settings, before):
        self.model = model
        self.settings = settings
        self.before = before  # the instance's own forward attribute before apply(), or None
        self.calls = 0  # read by _ReplacedForwardGuard
        self.__doc__ = getattr(self.stock, "__doc__", None)

    @property
    def stock(self):
        """The forward that runs under the patch (the class's, or the instance's own before apply())."""
        if self.before is not None:
            return self.before
        return type(self.model).forward.__get__(self.model)

    @property
    def __signature__(self) -> inspect.Signature:
        # The stock signature: Trainer reads the parameter names (which dataset columns to keep,
        # whether the forward takes num_items_in_batch).
        return inspect.signature(self.stock)

    def __call__(self, *args, **kwargs):
        if not torch.compiler.is_compiling():
            self.calls += 1
        # The settings are this patch's: a wrapper set over it later (accelerate's mixed-precision forward)
        # hides it from the instance's __dict__.
        return _run(self.model, self.stock, args, kwargs, self.settings)


def _class_forward(cls, original):
    @functools.wraps(original)
    def forward(self, *args, **kwargs):
        # Bound through the descriptor protocol, which dynamo traces (a types.MethodType call breaks
        # the graph), so that a patched class compiles in one graph as a patched instance does.
        return _run(self, original.__get__(self, type(self)), args, kwargs)

    return forward


# -- one forward ---------------------------------------------------------------------------------------------


@functools.cache
def _signature(function) -> inspect.Signature:
    return inspect.signature(function)


def _labels_of(original, args, kwargs):
    if "labels" in kwargs or not args:
        return kwargs.get("labels")
    function = getattr(original, "__func__", original)
    bound = _signature(function).bind_partial(None, *args, **kwargs)
    return bound.arguments.get("labels")


def _run(model, original, args, kwargs, settings: _Settings | None = None):
    if model in _ACTIVE:  # patched twice (instance and class): the outer patch does the work
        return original(*args, **kwargs)
    settings = settings or _settings_of(model)
    return_logits = kwargs.pop("return_logits", False)
    sample_weight = kwargs.pop("sample_weight", None)
    stats = _token_stat_names(kwargs.pop("return_token_stats", False))
    trl_head = "fused_lm_head" in kwargs and kwargs["fused_lm_head"]
    if trl_head:
        # TRL's fused LM head (add_fused_lm_head) installed under this patch: SFTTrainer's calls are served
        # here; any other caller gets TRL's head when it computes the loss that was asked for.
        if not settings.serves_trl_sft:
            if settings.default:
                return original(*args, **kwargs)
            trainer = _calling_trainer()
            if trainer is not None and _trl_sft(trainer) is not None:
                raise ValueError(
                    f"{type(trainer).__name__} calls the model with fused_lm_head=True, which crossent serves once "
                    "the trainer is patched: call crossent.integrations.transformers.apply(trainer, loss=...)"
                )
            raise ValueError(_refusal(type(trainer).__name__ if trainer is not None else "this caller", settings.loss,
                                      " (it calls the model with fused_lm_head=True)"))  # fmt: skip
        del kwargs["fused_lm_head"]
        if return_logits or sample_weight is not None:
            raise ValueError("fused_lm_head=True takes neither return_logits nor sample_weight")
        stats = ("argmax", "entropy")
    labels = _labels_of(original, args, kwargs)
    if labels is None:
        if sample_weight is not None:
            raise ValueError("sample_weight weighs the loss of each label; the forward got no labels")
        if stats:
            raise ValueError(
                "return_token_stats: the statistics are those of the labelled tokens; the forward got no labels"
            )
        if not settings.default and model.training and torch.is_grad_enabled():
            # A training forward without labels returns logits; a TRL trainer (GKD) computing its own
            # objective from them would silently not train the crossent loss.
            trainer = _calling_trainer()
            if trainer is not None and _is_trl(trainer):
                why = " (it calls the model without labels)"
                raise ValueError(_refusal(type(trainer).__name__, settings.loss, why))
        if kwargs.get("num_items_in_batch") is not None:
            # A count of labels but no labels: transformers.Trainer popped them to compute its own loss
            # from the full logits, which would replace the crossent loss without a word.
            raise ValueError(
                f"{type(model).__name__}: the patched forward got num_items_in_batch but no labels: "
                "transformers.Trainer removes the labels when label_smoothing_factor (or compute_loss_func) is "
                "set, and computes its own loss from the full logits in place of the crossent loss. Call "
                "xt.apply(trainer, loss, ...) (it takes over label_smoothing_factor), or set "
                "label_smoothing_factor=0 and pass label_smoothing= to apply()"
            )
        return original(*args, **kwargs)
    fused = not return_logits  # eval mode too: a from_pretrained model (eval) must not form logits silently
    if stats and not fused:
        raise ValueError("return_token_stats comes from the fused pass; with return_logits=True, read the logits")
    call = _Call(model, settings, labels, kwargs, sample_weight, fused, stats, per_token=trl_head)
    _ACTIVE.add(model)
    try:
        with call.installed():
            out = original(*args, **kwargs)
    except Exception as err:
        if call.loss is not None and not call.consumed and not isinstance(err, UnsupportedModel):
            # The forward used the head's output (the probe) for more than loss_function.
            raise UnsupportedModel(
                f"{call.who}: the forward failed on the head's output before its loss_function ran, so it does "
                f"more with the logits than the pattern crossent reproduces ({type(err).__name__}: {err})"
            ) from err
        raise
    finally:
        _ACTIVE.discard(model)
    out = call.finish(out)
    if trl_head:
        return call.trl_output(out)
    if stats:
        if not isinstance(out, dict):
            raise ValueError("return_token_stats puts the statistics on the output object: call with return_dict=True")
        out.token_stats = call.token_stats
    return out


def _token_stat_names(asked) -> tuple[str, ...]:
    if asked is True:
        return ("lse", "argmax", "entropy")
    if asked is False or asked is None:
        return ()
    names = (asked,) if isinstance(asked, str) else tuple(asked)
    unknown = [n for n in names if n not in TokenStats._fields[2:]]
    if unknown or not names:
        raise ValueError(
            f"return_token_stats must be a bool or names among ('lse', 'argmax', 'entropy'), got {asked!r}"
        )
    return names


class TokenStats(NamedTuple):
    """Per-token statistics of a patched forward's fused pass (``return_token_stats=``), shaped like the
    next-token labels (``labels[..., 1:]``, or ``shift_labels``): no logits are formed for them.

    ``target``: the next-token labels; ``mask``: the counted tokens (``target != ignore_index``).
    ``lse``: log-sum-exp of the post-processed logits (float32); ``argmax``: the predicted token;
    ``entropy``: ``-sum_j p_j log p_j`` of the softmax (float32); a field not asked for is None. Values at
    uncounted tokens are undefined: the properties below average over ``mask``.
    """

    target: Tensor
    mask: Tensor
    lse: Tensor | None = None
    argmax: Tensor | None = None
    entropy: Tensor | None = None

    @property
    def correct(self) -> Tensor:
        """Whether the label is the predicted token, per token (False where not counted)."""
        if self.argmax is None:
            raise ValueError("correct reads argmax: ask for it in return_token_stats")
        return (self.argmax == self.target) & self.mask

    @property
    def accuracy(self) -> Tensor:
        """The fraction of counted tokens whose label is the predicted token (0 without counted tokens)."""
        return self.mean(self.correct)

    @property
    def z_loss(self) -> Tensor:
        """``lse ** 2`` per token: the term that ``z_loss=`` weighs."""
        if self.lse is None:
            raise ValueError("z_loss is lse ** 2: ask for 'lse' in return_token_stats")
        return self.lse.square()

    def mean(self, values: Tensor) -> Tensor:
        """The mean of per-token ``values`` over the counted tokens, float32 (0 without counted tokens)."""
        total = torch.where(self.mask, values.float(), 0.0).sum()
        return total / self.mask.sum().clamp_min(1)


class _Call:
    """One patched forward given labels: what the head needs, and what it leaves for ``loss_function``."""

    def __init__(
        self, model, settings: _Settings, labels: Tensor, kwargs: dict, sample_weight, fused: bool,
        stats: tuple[str, ...] = (), per_token: bool = False,
    ):  # fmt: skip
        self.model, self.settings, self.fused = model, settings, fused
        self.stats, self.per_token = stats, per_token
        self.token_stats: TokenStats | None = None
        self.token_losses: Tensor | None = None
        self.who = type(model).__name__
        self.labels = labels
        self.shift_labels = kwargs.get("shift_labels")
        self.num_items = kwargs.get("num_items_in_batch")
        self.ignore_index = kwargs.get("ignore_index", -100)
        self.sample_weight = sample_weight
        self.logit_map = logit_map(model.config.model_type, model.config, self.who)
        self.loss: Tensor | None = None
        self.sent: Tensor | None = None
        self.received = None
        self.consumed = False

    @contextlib.contextmanager
    def installed(self):
        """The loss function (and, when fused, the head's forward) replaced for this call only."""
        model = self.model
        head = model.get_output_embeddings() if self.fused else None
        if self.fused and head is None:
            raise UnsupportedModel(f"{self.who}: get_output_embeddings() returned no head")
        saved_loss = model.__dict__.get("_loss_function")
        saved_head = head.__dict__.get("forward") if head is not None else None
        model.loss_function = self.loss_function
        if head is not None:
            _warn_on_logit_hooks(model, head)
            head.forward = functools.partial(self.head_forward, head)
        try:
            yield
        finally:
            _restore(model, "_loss_function", saved_loss)
            if head is not None:
                _restore(head, "forward", saved_head)

    # The head's forward in a fused call: the loss from its input, a probe instead of the logits.
    def head_forward(self, head, hidden: Tensor, *args, **kwargs):
        if args or kwargs or self.loss is not None:
            raise UnsupportedModel(f"{self.who}: the head is called more than once or with extra arguments")
        weight, bias = head_weights(head, self.who)
        target, shift, sample_weight = self.targets(hidden)
        result = linear_cross_entropy(
            hidden, weight, target, bias=bias, loss=self.settings.loss_for(self.logit_map),
            weight=_on(self.settings.weight, hidden.device), ignore_index=self.ignore_index, shift=shift,
            sample_weight=sample_weight, normalizer=None if self.per_token else self.num_items,
            reduction="none" if self.per_token else "mean", return_stats=self.stats or False,
            options=self.settings.engine,
        )  # fmt: skip
        self.loss, stats = result if self.stats else (result, None)
        if stats is not None:
            counted = target[..., 1:] if shift else target
            self.token_stats = TokenStats(
                counted, counted != self.ignore_index, **{name: getattr(stats, name) for name in self.stats}
            )
        if self.per_token:
            # TRL's SFTTrainer sums -log_probs and divides by num_items_in_batch (or the counted tokens):
            # the per-token losses, summed the same way, are the crossent loss.
            mask = self.token_stats.mask
            self.token_losses = torch.where(mask, self.loss.float(), 0.0)
            count = mask.sum().clamp_min(1) if self.num_items is None else _as_tensor(self.num_items, self.loss)
            self.loss = self.token_losses.sum() / count
        self.sent = probe(weight.shape[0], hidden.dim() - 1, hidden.dtype, hidden.device)
        return _like_output_of(weight, self.sent)

    def targets(self, hidden: Tensor):
        """``(target, shift, sample_weight)`` for the head's input ``hidden`` (``[..., D]``)."""
        rows = tuple(hidden.shape[:-1])
        weight = self.sample_weight
        if self.shift_labels is not None:
            target, shift = self.shift_labels, False
            if target.numel() != math.prod(rows):
                raise ValueError(
                    f"shift_labels has {target.numel()} entries for {math.prod(rows)} positions (shape {rows})"
                )
        else:
            target, shift = self.labels, True
            if target.dim() != len(rows):
                raise UnsupportedModel(
                    f"{self.who}: the head sees positions of shape {rows} for labels of shape "
                    f"{tuple(target.shape)}: the forward runs its head on more than the labelled sequence"
                )
            if tuple(target.shape) != rows:
                raise ValueError(
                    f"labels of shape {tuple(target.shape)} do not cover the {rows} positions the head sees "
                    "(with logits_to_keep, pass shift_labels for the kept positions)"
                )
        if weight is not None:
            if not isinstance(weight, Tensor) or weight.numel() != target.numel():
                raise ValueError(f"sample_weight must have one weight per label ({tuple(target.shape)}), got "
                                 f"{tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__}")  # fmt: skip
            weight = weight.reshape(rows).to(hidden.device)
        return target.reshape(rows).to(hidden.device), shift, weight

    # The model's loss_function for this call.
    def loss_function(self, logits, labels=None, vocab_size=None, **kwargs):
        if not self.fused:
            return self.dense_loss(logits, labels, **kwargs)
        if self.loss is None:
            raise UnsupportedModel(f"{self.who}: loss_function ran before the head (get_output_embeddings()) did")
        if torch.compiler.is_compiling():
            # An assert of the graph on every call: recording the check in _CHECKED would change what the
            # graph was compiled under, and compile it again.
            check_post_processing(self.who, self.logit_map, self.sent, logits)
        elif _CHECKED.get(self.model) != self.logit_map:
            check_post_processing(self.who, self.logit_map, self.sent, logits)
            _CHECKED[self.model] = self.logit_map
        self.received, self.consumed = logits, True
        return self.loss

    def dense_loss(
        self, logits: Tensor, labels, num_items_in_batch=None, ignore_index=-100, shift_labels=None, **kwargs
    ):
        """The same loss from materialised logits, with ``ForCausalLMLoss``'s semantics."""
        self.consumed = True
        if shift_labels is None:
            shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
        flat = logits.float().reshape(-1, logits.shape[-1])
        target = shift_labels.reshape(-1).to(flat.device)
        options = {
            "loss": self.settings.loss,
            "weight": _on(self.settings.weight, flat.device),
            "ignore_index": ignore_index,
        }
        if self.sample_weight is None and num_items_in_batch is None:
            return cross_entropy(flat, target, **options)
        if self.sample_weight is None:
            total = cross_entropy(flat, target, reduction="sum", **options)
        else:
            w = self.sample_weight if self.shift_labels is not None else F.pad(self.sample_weight, (0, 1))[..., 1:]
            per_row = cross_entropy(flat, target, reduction="none", **options)
            total = (per_row * w.reshape(-1).to(per_row)).sum()
        if num_items_in_batch is not None:
            return total / _as_tensor(num_items_in_batch, total)
        counted = target != ignore_index
        weight = options["weight"]
        denominator = counted.sum() if weight is None else weight[target[counted]].sum()
        return total / torch.where(denominator != 0, denominator, torch.ones_like(denominator))  # crossent: 0 rows -> 0

    def trl_output(self, out):
        """The output of TRL's fused LM head (``FusedCausalLMOutput``) from this crossent pass: ``log_probs``
        holds minus the per-token crossent loss (the log-probability of the label for cross-entropy),
        ``entropy`` and ``is_top1`` come from the pass's statistics, zero where a label is ignored."""
        from trl.trainer.utils import FusedCausalLMOutput

        stats = self.token_stats
        return FusedCausalLMOutput(
            loss=self.loss,
            log_probs=-self.token_losses,
            entropy=torch.where(stats.mask, stats.entropy, 0.0),
            is_top1=stats.correct,
            label_mask=stats.mask,
            aux_loss=out.get("aux_loss") if isinstance(out, dict) else None,
        )

    def finish(self, out):
        if not self.consumed:
            raise UnsupportedModel(
                f"{self.who}: the forward computed its loss without self.loss_function; crossent cannot patch it"
            )
        if not self.fused:
            return out
        if isinstance(out, dict):
            out["logits"] = None
            return out
        if isinstance(out, tuple):
            return tuple(None if x is self.received else x for x in out)
        return out


#: Models warned that their head's forward hooks see the probe rather than logits.
_WARNED_HOOKS: weakref.WeakSet = weakref.WeakSet()
#: Packages whose hooks on the head are infrastructure (sharding, placement, adapters), not logit readers.
_INFRASTRUCTURE = ("torch", "transformers", "accelerate", "peft", "deepspeed", "trl")


def _warn_on_logit_hooks(model: nn.Module, head: nn.Module) -> None:
    """Warn once per model when the head has forward hooks of the user's: in a fused call they run (with
    FSDP's and tensor parallelism's, which must), but the output they see is the probe, not logits."""
    if not head._forward_hooks or torch.compiler.is_compiling() or model in _WARNED_HOOKS:
        return
    def origin(hook):
        hook = getattr(hook, "func", hook)
        return getattr(getattr(hook, "__func__", hook), "__module__", None) or type(hook).__module__

    theirs = [h for h in head._forward_hooks.values() if origin(h).split(".")[0] not in _INFRASTRUCTURE]
    if theirs:
        _WARNED_HOOKS.add(model)
        names = ", ".join(getattr(h, "__qualname__", type(h).__name__) for h in theirs)
        warnings.warn(
            f"{type(model).__name__}: forward hooks on the head ({names}) run in the fused call, but its output "
            f"there is a placeholder row of shape [1, ..., vocabulary], not logits: no logits are formed. "
            "For per-token statistics pass return_token_stats=True (out.token_stats); for logits, return_logits=True",
            stacklevel=4,
        )


def _like_output_of(weight: Tensor, probe: Tensor) -> Tensor:
    """The probe as the head's output: for a tensor-parallel head (a DTensor weight), a replicated DTensor,
    which the parallel plan's output hook lays out as it would the logits (a gathering plan keeps it whole)."""
    dtensor = sys.modules.get("torch.distributed.tensor")
    if dtensor is None or not isinstance(weight, dtensor.DTensor):
        return probe
    mesh = weight.device_mesh
    return dtensor.DTensor.from_local(probe, mesh, [dtensor.Replicate()] * mesh.ndim)


def _restore(module: nn.Module, name: str, saved) -> None:
    if saved is None:
        module.__dict__.pop(name, None)
    else:
        module.__dict__[name] = saved


def _on(weight: Tensor | None, device) -> Tensor | None:
    return None if weight is None else weight.to(device)


def _as_tensor(count, like: Tensor) -> Tensor:
    return count.to(like.device) if isinstance(count, Tensor) else torch.as_tensor(count, device=like.device)
