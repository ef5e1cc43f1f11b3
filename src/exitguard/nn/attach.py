"""`attach_exits`: cut an existing model at named modules and put an exit head after each.

The model's forward is traced with ``torch.fx``, treating the named modules (and every
module that does not contain one) as opaque calls. The graph is then split after each named
module into stages; a split is only valid when the named module's output is the one value
that crosses it. Each head's input shape comes from one dry run.
"""

from __future__ import annotations

import difflib
import operator
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.fx
from torch import Tensor, nn

from exitguard.nn._modes import eval_mode
from exitguard.nn.confidence import ConfidenceFn
from exitguard.nn.heads import ClassifierHead, DenseHead, InputFormat
from exitguard.nn.network import EarlyExitNetwork
from exitguard.risk._validation import check_int

HeadFactory = Callable[[tuple[int, ...], int], nn.Module]


class _Root(nn.Module):
    """Calls the model with one argument, so that its other arguments keep their defaults."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Any:
        return self.model(x)


_STATIC_FACTS = ("dtype", "ndim")
"""Tensor attributes the tracer answers with real values (see :class:`_FactProxy`)."""


class _FactProxy(torch.fx.Proxy):
    """A proxy that knows the dtype and number of dimensions of the tensor it stands for.

    They are known for the model's input (from the dry-run batch) and for its parameters
    and buffers, and fixed for the network's lifetime, so a forward may branch on them
    (``if pixel_values.dtype != weight.dtype``, as Hugging Face models do) and still trace.
    The device and the shape are never answered: they may change after the cut.
    """

    def __getattr__(self, name: str) -> Any:
        facts = getattr(self.tracer, "facts", {})
        if name in _STATIC_FACTS and self.node in facts:
            return getattr(facts[self.node], name)
        return super().__getattr__(name)


class _CutTracer(torch.fx.Tracer):
    """Traces only into the modules that contain a cut; every other module stays one call."""

    def __init__(self, containers: set[str], *, example_input: Tensor | None = None) -> None:
        super().__init__()
        self.containers = containers
        self.example_input = example_input
        self.facts: dict[torch.fx.Node, Tensor] = {}
        self.tensors: dict[str, Tensor] = {}

    def trace(self, root: Any, concrete_args: dict[str, Any] | None = None) -> torch.fx.Graph:
        # Looked up before tracing: attribute access on modules is patched while it runs.
        self.tensors = {**dict(root.named_parameters()), **dict(root.named_buffers())}
        return super().trace(root, concrete_args)

    def proxy(self, node: torch.fx.Node) -> torch.fx.Proxy:
        return _FactProxy(node, self)

    def create_proxy(self, kind: str, target: Any, *args: Any, **kwargs: Any) -> torch.fx.Proxy:
        proxy = super().create_proxy(kind, target, *args, **kwargs)
        if kind == "placeholder" and self.example_input is not None:
            self.facts[proxy.node] = self.example_input
        elif kind == "get_attr" and target in self.tensors:
            self.facts[proxy.node] = self.tensors[target]
        return proxy

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name not in self.containers

    def call_module(
        self,
        m: nn.Module,
        forward: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        # nn.TransformerEncoder's forward branches on its inputs (fast path, masks), which
        # torch.fx cannot trace; without masks it is just its layers in turn, then the norm.
        if isinstance(m, nn.TransformerEncoder) and not self.is_leaf_module(
            m, self.path_of_module(m)
        ):
            extra = [*args[1:], *(v for v in kwargs.values() if v not in (None, False))]
            if extra:
                raise ValueError("a TransformerEncoder called with masks cannot be cut")
            x = args[0]
            for layer in m.layers:
                x = self.call_module(layer, layer.forward, (x,), {})
            if m.norm is not None:
                x = self.call_module(m.norm, m.norm.forward, (x,), {})
            return x
        return super().call_module(m, forward, args, kwargs)


def _model_output(value: Any) -> Any:
    """The logits of a model's output: the tensor itself, or the ``logits`` entry of a mapping.

    Hugging Face models return a ``ModelOutput`` (a mapping) whose ``logits`` entry is the
    prediction; anything else (a tuple, a mapping without ``logits``) is returned unchanged.
    """
    if isinstance(value, Mapping) and "logits" in value:
        return value["logits"]
    return value


def _passed_on(node: torch.fx.Node) -> torch.fx.Node:
    """The value a cut after ``node`` passes on: ``node[0]`` when only that element is used.

    A module that returns a tuple (as the layers of Hugging Face transformers 4.x do) can be
    cut when its successors read only the first element; the cut then follows that read.
    """
    users = list(node.users)
    if (
        len(users) == 1
        and users[0].op == "call_function"
        and users[0].target is operator.getitem
        and users[0].args[1:] == (0,)
    ):
        return users[0]
    return node


def _describe(node: torch.fx.Node) -> str:
    if node.op == "placeholder":
        return "the model's input"
    if node.op == "call_module":
        return f"the output of module {str(node.target).removeprefix('model.')!r}"
    target = getattr(node.target, "__name__", str(node.target))
    return f"the value {node.name!r} (from {target})"


def cut_into_stages(
    model: nn.Module, at: Sequence[str], *, example_input: Tensor | None = None
) -> list[torch.fx.GraphModule]:
    """Split ``model`` after each module named in ``at``: ``len(at) + 1`` stages.

    The stages share the model's modules and parameters (nothing is copied). Raises
    ValueError with the reason when a name is unknown, out of execution order, or when the
    model cannot be cut there. ``example_input`` (a batch) tells the tracer the input's dtype
    and number of dimensions, so that a forward may branch on them; the cut is then
    specialised to them (as it is to the parameters' dtypes).
    """
    modules = dict(model.named_modules())
    names = list(at)
    for name in names:
        if name == "" or name not in modules:
            close = difflib.get_close_matches(name, [n for n in modules if n], n=3)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            raise ValueError(
                f"`at`: {name!r} is not a module of {type(model).__name__}.{hint} "
                "Names are those of model.named_modules()."
            )
    if len(set(names)) != len(names):
        raise ValueError(f"`at` must not repeat a module name; got {names!r}.")
    for name in names:
        for other in names:
            if other != name and other.startswith(name + "."):
                raise ValueError(f"`at`: {other!r} lies inside {name!r}; cut at one or the other.")

    cuts = {f"model.{name}" for name in names}
    containers = {""}  # the modules traced through: the root and every ancestor of a cut
    for name in cuts:
        parts = name.split(".")
        containers.update(".".join(parts[:i]) for i in range(1, len(parts)))
    root = _Root(model)  # also holds any tensor constants the tracer lifts out of forward
    try:
        graph = _CutTracer(containers, example_input=example_input).trace(root)
    except Exception as error:
        raise ValueError(
            f"{type(model).__name__} cannot be cut: torch.fx could not trace its forward "
            f"({type(error).__name__}: {error}). Build the network from explicit stages with "
            "EarlyExitNetwork(stages, heads) instead."
        ) from error

    nodes = list(graph.nodes)
    position: dict[str, int] = {}
    for name in names:
        target = f"model.{name}"
        found = [i for i, n in enumerate(nodes) if n.op == "call_module" and n.target == target]
        if not found:
            raise ValueError(f"`at`: module {name!r} is never called by the model's forward.")
        if len(found) > 1:
            raise ValueError(
                f"`at`: module {name!r} is called {len(found)} times by the forward; an exit "
                "can only follow a module that runs once."
            )
        position[name] = found[0]
    order = sorted(names, key=position.__getitem__)
    if order != names:
        raise ValueError(
            f"`at` must list the modules in execution order; got {names!r}, but the forward "
            f"runs them as {order!r}."
        )
    output = nodes[-1]
    result = _model_output(output.args[0])
    if not isinstance(result, torch.fx.Node):
        raise ValueError(
            f"{type(model).__name__} cannot be cut: its forward must return one tensor (or a "
            f"mapping with a `logits` tensor); it returns {type(result).__name__}."
        )
    index_of = {node: i for i, node in enumerate(nodes)}
    position = {name: index_of[_passed_on(nodes[i])] for name, i in position.items()}
    if result is nodes[position[names[-1]]]:
        raise ValueError(
            f"`at`: nothing runs after {names[-1]!r}; the backbone's own output already is "
            "the last exit, so cut earlier."
        )

    bounds = [position[name] for name in names]
    spans = list(zip([-1, *bounds], [*bounds, len(nodes) - 1], strict=True))  # (after, through]
    stage_of = {}
    for index, (start, stop) in enumerate(spans):
        for node in nodes[start + 1 : stop + 1]:
            stage_of[node] = index

    stages = []
    for index, (start, stop) in enumerate(spans):
        entry = nodes[start] if index else next(n for n in nodes if n.op == "placeholder")
        stage_graph = torch.fx.Graph()
        env: dict[torch.fx.Node, torch.fx.Node] = {entry: stage_graph.placeholder("x")}
        for node in nodes[start + 1 : stop + 1]:
            if node.op == "placeholder":
                continue
            for source in node.all_input_nodes:
                if source in env:
                    continue
                if source.op == "get_attr":  # a parameter or buffer: read it again here
                    env[source] = stage_graph.node_copy(source)
                    continue
                crossed = names[stage_of[source]]
                raise ValueError(
                    f"{type(model).__name__} cannot be cut at {crossed!r}: {_describe(source)} "
                    f"is computed before that cut and used after it, so more than the output "
                    f"of {crossed!r} would have to cross it (a skip connection or a shape taken "
                    "earlier). Cut at a module whose output is the only value passed on, or "
                    "build the network from explicit stages."
                )
            if node.op == "output":
                stage_graph.output(env[result])
            else:
                env[node] = stage_graph.node_copy(node, env.__getitem__)
        if index < len(names):
            stage_graph.output(env[nodes[stop]])
        stages.append(torch.fx.GraphModule(root, stage_graph, class_name=f"Stage{index}"))
    return stages


def _make_head(
    head: str | HeadFactory,
    shape: tuple[int, ...],
    num_classes: int,
    out_shape: tuple[int, ...],
    options: Mapping[str, Any],
    factory: dict[str, Any],
) -> nn.Module:
    if callable(head):
        module = head(shape, num_classes)
        if not isinstance(module, nn.Module):
            raise TypeError(f"`head` must return an nn.Module; got {type(module).__name__}.")
        return module.to(**factory)
    if head == "classifier":
        formats: dict[int, InputFormat] = {3: "NCHW", 2: "NLC", 1: "NC"}
        if len(shape) not in formats:
            raise ValueError(
                "`head='classifier'` reads features (B, C, H, W), (B, T, D) or (B, D); got "
                f"features of shape (B, {', '.join(map(str, shape))})."
            )
        in_features = shape[0] if len(shape) == 3 else shape[-1]
        return ClassifierHead(
            in_features, num_classes, input_format=formats[len(shape)], **options, **factory
        )
    if head == "dense":
        if len(shape) != 3 or len(out_shape) != 3:
            raise ValueError(
                "`head='dense'` needs feature maps (B, C, H, W) and a backbone output "
                f"(B, C, H, W); got features (B, {', '.join(map(str, shape))}) and output "
                f"(B, {', '.join(map(str, out_shape))})."
            )
        return DenseHead(shape[0], num_classes, out_size=out_shape[1:], **options, **factory)
    raise ValueError(f"`head` must be 'classifier', 'dense' or a callable; got {head!r}.")


def attach_exits(
    model: nn.Module,
    at: Sequence[str],
    *,
    num_classes: int | None = None,
    input_shape: Sequence[int] | None = None,
    example_input: Tensor | None = None,
    head: str | HeadFactory = "classifier",
    head_options: Mapping[str, Any] | None = None,
    confidence: str | ConfidenceFn = "max_softmax",
) -> EarlyExitNetwork:
    """Cut ``model`` after the named modules and attach an exit head after each.

    The model's own output is the last exit. The network shares the model's modules and
    parameters (nothing is copied): training it trains the model.

    Parameters
    ----------
    model : nn.Module
        The backbone; its forward takes one tensor and returns one tensor of logits,
        (B, C) or (B, C, *S), or a mapping with such a ``logits`` entry (a Hugging Face
        ``ModelOutput``). Works for CNNs (feature maps (B, C, H, W)) and transformer
        encoders (tokens (B, T, D)), e.g. timm's ResNet, ConvNeXt and ViT, and Hugging Face
        BERT and ViT classifiers called on one tensor (token ids without padding, or pixels).
        The forward may branch on the dtype and number of dimensions of its input and
        parameters; the cut is specialised to those seen here.
    at : sequence of str
        Names from ``model.named_modules()``, in execution order: an exit follows each.
        Each must run once and its output must be the only value its successors use; a
        module returning a tuple of which only the first element is used (as the layers of
        transformers 4.x do) is cut after that element.
    num_classes : int, optional
        Number of classes; by default that of the model's output. Checked against it.
    input_shape : sequence of int, optional
        Per-sample input shape (no batch axis) for the dry run with random floats.
    example_input : Tensor, optional
        A batch for the dry run instead (e.g. token ids). Give exactly one of the two.
    head : {"classifier", "dense"} or callable
        The exit head: :class:`ClassifierHead` (pool -> norm -> linear), :class:`DenseHead`
        (1x1 conv, per-pixel logits), or ``head(feature_shape, num_classes) -> nn.Module``
        with ``feature_shape`` the per-sample shape of the stage output.
    head_options : mapping, optional
        Keyword arguments for the head class, e.g. ``{"pool": "cls", "hidden_features": 256}``.
    confidence : str or callable
        The network's confidence measure (see :class:`EarlyExitNetwork`).

    Returns
    -------
    EarlyExitNetwork
        With ``len(at) + 1`` exits and ``input_shape`` set from the dry run.

    Raises
    ------
    ValueError
        For unknown names, names out of execution order, and models that cannot be cut at
        the names (with the reason), or a ``num_classes`` that contradicts the model.
    TypeError
        For arguments of the wrong type.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> backbone = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    >>> network = attach_exits(backbone, at=["1"], input_shape=(4,))
    >>> network.n_exits, tuple(network(torch.randn(2, 4)).shape)
    (2, (2, 2, 3))
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be an nn.Module; got {type(model).__name__}.")
    if isinstance(at, str) or not isinstance(at, Sequence) or not at:
        raise TypeError(
            f"`at` must be a non-empty list of module names; got {at!r}"
            + (f". Write at=[{at!r}]." if isinstance(at, str) else ".")
        )
    if not all(isinstance(name, str) for name in at):
        raise TypeError(f"`at` must hold module names (str); got {at!r}.")
    if (input_shape is None) == (example_input is None):
        raise ValueError(
            "give exactly one of `input_shape` (per-sample shape, e.g. (3, 32, 32)) and "
            "`example_input` (a batch) for the dry run."
        )
    reference = next(iter(model.parameters()), None)
    factory: dict[str, Any] = {
        "device": reference.device if reference is not None else torch.device("cpu"),
        "dtype": reference.dtype if reference is not None else torch.get_default_dtype(),
    }
    if example_input is None:
        shape = tuple(input_shape)  # type: ignore[arg-type]
        if not shape or not all(isinstance(d, int) and d > 0 for d in shape):
            raise ValueError(f"`input_shape` must be positive integers; got {input_shape!r}.")
        generator = torch.Generator().manual_seed(0)
        example_input = torch.randn((2, *shape), generator=generator).to(**factory)
    elif not isinstance(example_input, Tensor) or example_input.ndim < 1:
        raise TypeError(f"`example_input` must be a batch tensor; got {example_input!r}.")
    check_int(num_classes, "num_classes", allow_none=True)
    options = dict(head_options or {})

    stages = cut_into_stages(model, at, example_input=example_input)
    with eval_mode(model), torch.no_grad():  # a dry run must not touch BatchNorm statistics
        expected = _model_output(model(example_input))
        features, h = [], example_input
        for index, stage in enumerate(stages):
            h = stage(h)
            if not isinstance(h, Tensor):
                where = f"module {at[index]!r}" if index < len(at) else "the model"
                raise ValueError(
                    f"{where} returns {type(h).__name__}; an exit can only follow a module "
                    "that returns one tensor."
                )
            features.append(h)
    output = features[-1]
    if not isinstance(expected, Tensor) or not torch.allclose(
        output, expected, rtol=1e-4, atol=1e-5
    ):
        raise ValueError(
            f"cutting {type(model).__name__} at {list(at)!r} changed its output; the model "
            "cannot be cut there (its forward may depend on state the cut does not carry)."
        )
    if output.ndim < 2:
        raise ValueError(
            "the model's output must be logits (B, C) or (B, C, *S); got shape "
            f"{tuple(output.shape)}."
        )
    classes = output.shape[1]
    if num_classes is not None and num_classes != classes:
        raise ValueError(
            f"`num_classes` is {num_classes}, but the model's output has {classes} classes "
            f"(shape {tuple(output.shape)}); the backbone's head is the last exit."
        )
    out_shape = tuple(output.shape[1:])
    heads = [
        _make_head(head, tuple(f.shape[1:]), classes, out_shape, options, factory)
        for f in features[:-1]
    ]
    network = EarlyExitNetwork(
        stages, heads, confidence=confidence, input_shape=tuple(example_input.shape[1:])
    )
    network.train(model.training)
    with eval_mode(network), torch.no_grad():
        for index, (head_module, feature) in enumerate(zip(heads, features[:-1], strict=True)):
            shape = tuple(head_module(feature).shape[1:])
            if shape != out_shape:
                raise ValueError(
                    f"exit {index}'s head gives logits (B, {', '.join(map(str, shape))}), "
                    f"but the model's output is (B, {', '.join(map(str, out_shape))}); every "
                    "exit must match it."
                )
    return network
