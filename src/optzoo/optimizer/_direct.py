"""Direct calls of compiled steps: a call like an earlier one skips dynamo's frame evaluation and guards.

Why: a kernel that streams tens of MB leaves none of the Python objects that the next compiled call walks
through in the CPU's caches. Dynamo's frame evaluation, its guards and AOT autograd's wrappers then cost
~250 us per call instead of ~25 us (a tiny step after a 200 MB sweep, 2-core AMD EPYC, torch 2.13), and
ResNet-50's step makes ~12 calls, each right after another's kernel. Called directly, the graph costs ~95 us.

How: the compiled steps' backend is inductor, wrapped (:class:`Backend`). For each graph it compiles, it
records where each graph input lies in that call's arguments (:class:`Graph`: the tensors depth first, each
dynamic size, storage offset or stride as a tensor's), and the graph notes itself as the one a call ran. After each call through
dynamo, the executor keeps, per optimizer and graph key, that graph with what dynamo's guards checked of the
call (:class:`_Site`). A later call with the same key calls the graph itself where its arguments pass the same
checks, each cheap:

- the same number of tensors, of the same types, dtypes, devices and dimensions, the same tensor object at
  the places where the recorded call had one object twice, and no two distinct tensors of the recorded call
  sharing memory (a graph compiled for aliased inputs is only ever used through dynamo);
- the same non-tensor values among the arguments;
- the same values of the attributes the optimizer's kernel reads (``Optimizer._kernel_reads``, checked
  against the kernels by a test), for optzoo's own classes only (a subclass's kernel may read anything);
- torch's global state as dynamo's own guard records it (grad mode, autocast, ...), no torch-function or
  dispatch mode, no tracing under way (a user's ``torch.compile`` around the step), and dynamo on as by default
  (no ``force_eager`` stance), and no ``torch._dynamo.reset()`` since the graph was compiled (a reset makes
  dynamo compile again, with the configuration of then).

Sizes and strides are not checked here: the graph's own code asserts every input's size and stride before it
writes anything, and a failed assertion sends the call through dynamo (as does a dynamic value below 2, which
dynamo would give a graph of its own). Anything else goes through dynamo,
which checks its guards, compiles again where needed, and refreshes the record.

A direct call on the CPU also skips the wrappers around inductor's code (dynamo's disable context, AOT autograd's
runtime wrapper, ``CompiledFxGraph.__call__``) where what they do for the graph is known from a call through them
(:meth:`Graph.learn`): it runs the code with dynamo's frame evaluation off and bumps the version counters of the
inputs that call bumped (the ones the kernel writes), as they do. Under the profiler the wrappers stay (their
ranges are what a user's trace shows).
"""
from __future__ import annotations

import operator
import threading
import types

import torch

_PLAIN = (torch.Tensor, torch.nn.Parameter)


class _Call(threading.local):
    """The call passing through dynamo on this thread: its tensors (where a compiled graph's inputs are read
    from) and the graph that dynamo ran for it."""

    leaves = None
    ran = None
    runs = 0


_CALL = _Call()


def _flatten(x, tensors, consts):
    """The tensors of ``x`` depth first (lists and tuples), and its other values."""
    if isinstance(x, torch.Tensor):
        tensors.append(x)
    elif isinstance(x, (list, tuple)):
        for y in x:
            _flatten(y, tensors, consts)
    else:
        consts.append(x)


def flatten(args):
    """A step's arguments but the optimizer (``args[1:]``): its tensors and its other values."""
    tensors, consts = [], []
    _flatten(args[1:], tensors, consts)
    return tensors, tuple(consts)


class Graph:
    """A compiled graph and where its inputs lie in a call's tensors: ``(k, None)`` the k-th tensor itself,
    ``(k, d)`` its size in dimension ``d``, ``(k, -1)`` its storage offset, ``(k, -2 - d)`` its stride in ``d``."""

    __slots__ = ("fn", "places", "boxed", "code", "writes")

    @classmethod
    def make(cls, gm, example_inputs, leaves, fn):
        """The graph ``fn`` compiled from ``gm`` for a call whose tensors are ``leaves``; None where an input
        is not found among them (a tensor the step read from elsewhere, a symbol that is no input's size,
        storage offset or stride)."""
        if leaves is None:
            return None
        place = {id(t): k for k, t in enumerate(leaves)}
        nodes = [n for n in gm.graph.nodes if n.op == "placeholder"]
        if len(nodes) != len(example_inputs):
            return None
        dims = {}
        for node, x in zip(nodes, example_inputs):
            val = node.meta.get("example_value")
            if isinstance(x, torch.Tensor) and id(x) in place and isinstance(val, torch.Tensor):
                k = place[id(x)]
                # a size (d >= 0), the storage offset (-1: a view into a buffer of states), a stride (-2 - d)
                found = [(size, d) for d, size in enumerate(val.shape)] + [(val.storage_offset(), -1)] + \
                    [(stride, -2 - d) for d, stride in enumerate(val.stride())]
                for sym, d in found:
                    if isinstance(sym, torch.SymInt):
                        dims.setdefault(str(sym), (k, d))
        places = []
        for node, x in zip(nodes, example_inputs):
            got = (place.get(id(x)), None) if isinstance(x, torch.Tensor) else \
                dims.get(str(node.meta.get("example_value")), (None, None)) if isinstance(x, torch.SymInt) else \
                (None, None)
            if got[0] is None:
                return None
            places.append(got)
        graph = cls()
        graph.fn, graph.places, graph.boxed = fn, tuple(places), False
        graph.code, graph.writes = None, ()  # inductor's code itself, once learned (:meth:`learn`); False: never
        return graph

    def __call__(self, leaves):
        return self.call(list(map(_input, map(leaves.__getitem__, map(_FIRST, self.places)),
                                  map(_SECOND, self.places))))

    def call(self, args):
        """The graph on its inputs ``args`` (a list the call consumes): inductor's code itself where it is known
        (:meth:`learn`), else through dynamo's and AOT autograd's wrappers."""
        if any(type(x) is int and x < 2 for x in args):  # dynamo specializes 0 and 1: not this graph's
            raise AssertionError("a size, offset or stride below 2 for a dynamic one")
        code = self.code
        if code and not _profiling():  # (profiled: the wrappers' ranges, as a user's trace expects them)
            written = [args[k] for k in self.writes]
            prior = _SET_EVAL_FRAME(None)  # (as dynamo's disable wrapper: a compiled caller's frames stay its own)
            try:
                code(args)
            finally:
                _SET_EVAL_FRAME(prior)
            _BUMP(written)  # what AOT autograd's wrapper does (torch.autograd.graph.increment_version)
            return ()
        return self.fn(args) if self.boxed else self.fn(*args)

    def learn(self, tensors, before, after):
        """After a call through dynamo that ran this graph once on ``tensors`` (their version counters ``before``
        and ``after`` it; None where a tensor has none): inductor's compiled code under the wrappers, and the
        inputs whose versions the call bumped (those the kernel writes in place), for :meth:`call`.

        Why: a call's wrappers (dynamo's disable context, AOT autograd's runtime wrapper, inductor's
        ``CompiledFxGraph.__call__``) cost ~10 us hot and ~100 us right after a kernel that streamed 120 MB (their
        code and objects out of the CPU's caches), at each of ResNet-50's 12-54 calls a step. What they do for
        these graphs (no outputs, no gradient mode, no autocast, every input mutation inside the graph) is: run
        the code with dynamo's frame evaluation off, and bump the written inputs' version counters. Anything else
        (another layout of the wrappers, outputs, a count bumped twice or outside the inputs) keeps the wrappers."""
        if self.code is not None:
            return
        self.code = False
        if before is None or after is None or _SET_EVAL_FRAME is None or torch.is_grad_enabled() or \
                _any_autocast() or not all(t.device.type == "cpu" for t in tensors):
            return  # (on other devices the wrappers stay: unmeasured, as every GPU path here)
        inputs = {k for k, d in self.places if d is None}
        bumped = _written(tensors, before, after)
        if bumped is None or not bumped <= inputs:
            return
        cfg = _compiled_code(self.fn)
        if cfg is None or cfg.output_strides or not callable(getattr(cfg, "current_callable", None)):
            return
        self.writes = tuple(pos for pos, (k, d) in enumerate(self.places) if d is None and k in bumped)
        if len({self.places[pos][0] for pos in self.writes}) != len(bumped):
            return
        if not _apart_in_memory(tensors) and sorted(getattr(cfg, "mutated_input_idxs", None) or ()) != \
                list(self.writes):
            # inputs sharing memory (PAIRS, the flat layout): the code must write the inputs in our places, as it
            # does where AOT autograd compiled them as inputs of their own; had it merged them into one base (a
            # torch whose overlap test is stricter than _apart's), the code would take other inputs
            return
        self.code = cfg.current_callable


_FIRST, _SECOND = operator.itemgetter(0), operator.itemgetter(1)


def _apart_in_memory(tensors):
    """Whether the (distinct) tensors each have a memory of their own."""
    seen = {id(t): t for t in tensors}
    return len({t.untyped_storage().data_ptr() for t in seen.values()}) == len(seen)


def _written(tensors, before, after):
    """The places of the tensors that a call wrote, from their version counters ``before`` and ``after`` it (AOT
    autograd's wrapper bumps each written input once), or None where that is unclear. Views of one tensor share
    its counter (a weight's halves in pairs, the executor's PAIRS): a counter moved by as many as the views
    that share it means each of them was written; one moved by fewer, by no one of them."""
    shared = {}
    for k, t in enumerate(tensors):
        base = t._base if t._base is not None else t
        shared.setdefault(id(base), {})[id(t)] = k  # (a tensor object's last place, as Graph.make's)
    written = set()
    for views in shared.values():
        first = next(iter(views.values()))
        moved = after[first] - before[first]
        if moved == len(views):
            written.update(views.values())
        elif moved:
            return None
    return written


def _set_eval_frame():
    try:
        return torch._C._dynamo.eval_frame.set_eval_frame
    except AttributeError:  # pragma: no cover - another dynamo layout: the wrappers stay
        return None


_SET_EVAL_FRAME = _set_eval_frame()


def _profiling():
    return getattr(torch.autograd.profiler, "_is_profiler_enabled", False)


def _bumper():
    """``increment_version`` of a list of tensors (torch's public function; one C call where it takes a list)."""
    try:
        torch._C._increment_version([torch.empty(0)])
        return torch._C._increment_version
    except Exception:  # pragma: no cover - an older torch: one tensor at a time
        return lambda tensors: [torch.autograd.graph.increment_version(t) for t in tensors]


_BUMP = _bumper()


def _any_autocast():
    check = getattr(torch._C, "_is_any_autocast_enabled", None)
    return True if check is None else check()


def _compiled_code(fn):
    """The one ``CompiledFxGraph`` (inductor's compiled code) under the wrappers of ``fn``, found through their
    closures and ``compiled_fn`` attributes; None where there is not exactly one (another torch's layout)."""
    try:
        from torch._inductor.output_code import CompiledFxGraph
    except Exception:  # pragma: no cover - another inductor layout
        return None
    found, seen, todo = [], set(), [fn]
    while todo and len(seen) < 64:
        f = todo.pop()
        if id(f) in seen:
            continue
        seen.add(id(f))
        if isinstance(f, CompiledFxGraph):
            found.append(f)
            continue
        if isinstance(f, types.FunctionType):
            for cell in f.__closure__ or ():
                try:
                    x = cell.cell_contents
                except ValueError:  # an empty cell
                    continue
                if isinstance(x, (types.FunctionType, CompiledFxGraph)) or "compiled_fn" in getattr(
                        type(x), "__dict__", {}) or hasattr(x, "__dict__") and "compiled_fn" in x.__dict__:
                    todo.append(x)
        else:
            inner = getattr(f, "__dict__", {}).get("compiled_fn")
            if inner is not None:
                todo.append(inner)
    return found[0] if len(found) == 1 else None


def _versions(tensors):
    """The tensors' version counters, or None where one has none (a tensor made under ``inference_mode``)."""
    try:
        return list(map(_VERSION, tensors))
    except RuntimeError:
        return None


_VERSION = operator.attrgetter("_version")


def _input(t, d):
    """What a graph input at place ``(k, d)`` is of the call's k-th tensor ``t`` (see :class:`Graph`)."""
    return t if d is None else t.size(d) if d >= 0 else t.storage_offset() if d == -1 else t.stride(-2 - d)


class Backend:
    """Inductor (with ``options``), each graph it compiles wrapped so that a call notes it ran
    (:data:`_CALL`), with its :class:`Graph` record."""

    def __init__(self, options):
        self.inductor = torch._TorchCompileInductorWrapper(None, options, True)

    def __call__(self, gm, example_inputs):
        fn = self.inductor(gm, example_inputs)
        graph = Graph.make(gm, example_inputs, _CALL.leaves, fn)
        if graph is None:
            return fn

        def ran(*args):
            # dynamo's calling convention, seen: the inputs one by one, or one list of them ("boxed")
            graph.boxed = len(args) == 1 and isinstance(args[0], list) and len(graph.places) != 1
            _CALL.ran, _CALL.runs = graph, _CALL.runs + 1
            return fn(*args)
        if hasattr(fn, "_boxed_call"):
            ran._boxed_call = fn._boxed_call
        return ran


def backend(options):
    """The backend for ``torch.compile`` (:class:`Backend`), or None where this torch lacks what it needs
    (then the plain inductor backend, and every call through dynamo)."""
    try:
        torch._C._dynamo.guards.GlobalStateGuard  # noqa: B018 - present since torch 2.1
        torch._C._len_torch_function_stack  # noqa: B018
        torch._C._len_torch_dispatch_stack  # noqa: B018
        return Backend(options)
    except Exception:  # pragma: no cover - an older or other torch
        return None


_DTYPE = operator.attrgetter("dtype")


def _signature(tensors):
    """The tensors' types, dtypes, devices and dimensions (C-level maps: a direct call checks them each time)."""
    return (tuple(map(type, tensors)), tuple(map(_DTYPE, tensors)), tuple(map(torch.Tensor.get_device, tensors)),
            tuple(map(torch.Tensor.dim, tensors)))


def _repeats(tensors):
    """Pairs of places holding one tensor object (a later place and the first)."""
    first, pairs = {}, []
    for k, t in enumerate(tensors):
        j = first.setdefault(id(t), k)
        if j != k:
            pairs.append((k, j))
    return tuple(pairs)


def _apart(tensors):
    """Whether no two of these (distinct) tensors can overlap in memory: each in a memory of its own, or, where
    several view one (a weight's halves in pairs, the executor's PAIRS), each two of those apart by
    :func:`_disjoint` (for which AOT autograd compiles them as inputs of their own, as any two tensors)."""
    by = {}
    for t in tensors:
        by.setdefault(t.untyped_storage().data_ptr(), []).append(t)
    return all(_disjoint(a, b) for views in by.values() if len(views) > 1
               for k, a in enumerate(views) for b in views[k + 1:])


def _disjoint(a, b):
    """Two views of one memory that share no element: one ends before the other starts, or both are 2-D with
    contiguous rows of one stride, the rows of one lying between the other's."""
    if not a.numel() or not b.numel():
        return True
    if a.storage_offset() > b.storage_offset():
        a, b = b, a
    if a.storage_offset() + sum((n - 1) * st for n, st in zip(a.shape, a.stride())) < b.storage_offset():
        return True
    delta = b.storage_offset() - a.storage_offset()
    return a.dim() == b.dim() == 2 and a.stride(1) == b.stride(1) == 1 and a.stride(0) == b.stride(0) and \
        a.shape[1] <= delta and delta + b.shape[1] <= a.stride(0)


def _modes_off():
    """No torch-function or dispatch mode, no tracing under way, and dynamo on as by default (no
    ``torch.compiler.set_stance("force_eager")``, no ``torch._dynamo.config.disable``): else dynamo decides."""
    return not torch._C._len_torch_function_stack() and not torch._C._len_torch_dispatch_stack() and \
        not torch.compiler.is_compiling() and _dynamo_default()


def _dynamo_default():
    try:
        from torch._dynamo import config, eval_frame
        return eval_frame._stance.stance == "default" and not config.disable
    except Exception:  # pragma: no cover - another dynamo layout: no direct calls
        return False


class _Site:
    """What a call through dynamo ran (:class:`Graph`) and what of it a direct call must match."""

    __slots__ = ("graph", "n", "distinct", "signature", "repeats", "consts", "reads", "state", "code")

    @classmethod
    def make(cls, opt, graph, tensors, consts, code=None):
        """``code``: the compiled function's code object, while dynamo's record of what it compiled holds it
        (``torch._dynamo.reset()`` empties that record: the graphs compiled before are no longer called)."""
        if graph is None or not _modes_off() or not all(type(t) in _PLAIN for t in tensors) or \
                (code is not None and not _compiled_before(code)):
            return None
        repeats = _repeats(tensors)
        seen = {id(t): t for t in tensors}
        if not _apart(seen.values()):
            return None  # inputs that may overlap: dynamo's graph for them may expect it
        site = cls()
        site.graph, site.n, site.distinct, site.repeats = graph, len(tensors), len(seen), repeats
        site.signature, site.consts, site.reads = _signature(tensors), consts, _reads(opt)
        site.state = torch._C._dynamo.guards.GlobalStateGuard()
        site.code = code
        return site

    def matches(self, opt, tensors, consts):
        """Whether a call with these tensors and other values passes the checks of the call recorded."""
        return len(tensors) == self.n and consts == self.consts and len(set(map(id, tensors))) == self.distinct \
            and all(tensors[k] is tensors[j] for k, j in self.repeats) and _signature(tensors) == self.signature \
            and self.current(opt)

    def current(self, opt, now=None):
        """The checks that do not depend on the call's tensors: the kernel's attributes, torch's global state, no
        mode or tracing under way, and no ``torch._dynamo.reset()`` since the graph was compiled. ``now``:
        :func:`step_checks` of ``opt``, where a step checks many calls (made once for them all)."""
        reads, modes_off = now if now is not None else (_reads(opt), None)
        return reads == self.reads and self.state.check() and (_modes_off() if modes_off is None else modes_off) \
            and (self.code is None or _compiled_before(self.code))


def step_checks(opt):
    """What :meth:`_Site.current` reads that is the same for every call of a step: the kernel's attributes of
    ``opt`` and :func:`_modes_off` (~2.5 us a call, several times that right after a kernel that streamed tens of
    MB: the objects read are out of the CPU's caches)."""
    return _reads(opt), _modes_off()


def _compiled_before(code):
    """Whether dynamo's record of the code objects it compiled holds ``code`` (emptied by ``torch._dynamo.reset()``);
    True where this torch has no such record."""
    if not _INPUT_CODES:
        try:
            from torch._dynamo import convert_frame
            _INPUT_CODES.append(convert_frame.input_codes)  # (reset empties this object; it is never replaced)
        except Exception:  # pragma: no cover - another dynamo layout
            _INPUT_CODES.append(None)
    return _INPUT_CODES[0] is None or code in _INPUT_CODES[0]


_INPUT_CODES = []


def _reads(opt):
    return tuple(getattr(opt, name, None) for name in type(opt)._kernel_reads)


def eligible(opt):
    """Whether ``opt``'s steps may be called directly: optzoo's own classes, whose kernels read only
    ``_kernel_reads`` of the instance. Optzoo's own: under this package's name, whatever it is imported as
    (``bench/ab.py`` imports a revision as ``optzoo_base``, whose classes then took no direct calls)."""
    return type(opt).__module__.startswith(_PACKAGE)


#: This package's top-level name and a dot.
_PACKAGE = __name__.split(".")[0] + "."


def run(key, fn, args):
    """``fn(*args)`` (a compiled step of graph ``key``): the graph itself where an earlier call of ``key``
    through dynamo ran one and these arguments pass its checks (:class:`_Site`); else :func:`through`."""
    opt = args[0]
    tensors, consts = flatten(args)
    site = opt.__dict__.get("_direct", {}).get(key)
    if site is not None and site.matches(opt, tensors, consts):
        try:
            return site.graph(tensors)
        except AssertionError:  # a size or stride the graph does not take: asserted before any write
            opt.__dict__["_direct"].pop(key, None)
    return through(key, fn, args, tensors, consts)


class Replay:
    """A call that :func:`run` would make directly, prepared for later calls that differ from it only in some of
    its tensors (a step's gradients and scalars, ``variable``): the graph's inputs are computed once, and a
    later call puts the new tensors in their places, with the checks of :meth:`_Site.matches` on them alone.
    Its other tensors must stay the same objects of the same sizes (the caller's views, which it checks)."""

    __slots__ = ("key", "site", "args", "spots", "fixed", "signature")

    @classmethod
    def make(cls, key, args, variable):
        """The replay of ``fn(*args)`` (graph ``key``); None where :func:`run` would not call it directly.
        ``variable``: distinct tensors among ``args``, in the order later calls give theirs."""
        opt = args[0]
        tensors, consts = flatten(args)
        site = opt.__dict__.get("_direct", {}).get(key)
        ids = {id(t): j for j, t in enumerate(variable)}
        if site is None or len(ids) != len(variable) or not site.matches(opt, tensors, consts):
            return None
        rep = cls()
        rep.key, rep.site, rep.signature = key, site, _signature(variable)
        rep.args, rep.spots = [], [[] for _ in variable]
        for pos, (k, d) in enumerate(site.graph.places):
            j = ids.get(id(tensors[k]))
            if j is not None:
                rep.spots[j].append((pos, d))
            rep.args.append(_input(tensors[k], d))
        for spots in rep.spots:  # (not keeping the recorded call's gradients alive)
            for pos, _ in spots:
                rep.args[pos] = None
        rep.fixed = frozenset(id(t) for t in tensors if id(t) not in ids)
        return rep

    def inputs(self, opt, variable, now=None):
        """The graph's inputs with ``variable`` in the recorded ones' places, or None where a check fails. A step
        prepares all of its calls before the first kernel runs: right after a kernel that streamed tens of MB,
        the same checks cost several times as much (the objects they read are out of the CPU's caches).
        ``now``: :func:`step_checks` of ``opt``, made once for a step's calls."""
        site = self.site
        if opt.__dict__.get("_direct", {}).get(self.key) is not site or _signature(variable) != self.signature \
                or len(set(map(id, variable))) != len(variable) or not self.fixed.isdisjoint(map(id, variable)) \
                or not site.current(opt, now):
            return None
        args = self.args.copy()
        for t, spots in zip(variable, self.spots):
            for pos, d in spots:
                args[pos] = _input(t, d)
        return args

    def run(self, opt, args):
        """The graph on :meth:`inputs`' ``args``: True, or False where it refused them (nothing ran)."""
        try:
            self.site.graph.call(args)
        except AssertionError:  # a size or stride the graph does not take: asserted before any write
            opt.__dict__["_direct"].pop(self.key, None)
            return False
        return True


#: Graph keys whose compiling broke a graph (Python between graphs, which a direct call would skip).
_BROKEN = set()


def _breaks():
    try:
        from torch._dynamo.utils import counters
        return sum(counters["graph_break"].values())
    except Exception:  # pragma: no cover - another dynamo layout: no direct calls
        return None


def through(key, fn, args, tensors=None, consts=None):
    """``fn(*args)`` through dynamo, the graphs it compiles recorded against these arguments' tensors; what it
    ran kept for direct calls of ``key`` (:func:`run`) where it was one whole graph."""
    if tensors is None:
        tensors, consts = flatten(args)
    breaks = _breaks()
    before = _versions(tensors)
    _CALL.leaves, _CALL.ran, _CALL.runs = tensors, None, 0
    try:
        out = fn(*args)
    finally:
        _CALL.leaves = None
    ran, runs = _CALL.ran, _CALL.runs
    _CALL.ran = None
    if ran is not None and runs == 1 and ran.code is None:
        ran.learn(tensors, before, _versions(tensors))
    if breaks is None or _breaks() != breaks:
        _BROKEN.add(key)
    opt = args[0]
    code = getattr(getattr(fn, "_torchdynamo_orig_callable", None), "__code__", None)
    site = _Site.make(opt, ran, tensors, consts, code) if runs == 1 and key not in _BROKEN and eligible(opt) \
        else None
    sites = opt.__dict__.setdefault("_direct", {})
    if site is None:
        sites.pop(key, None)
    else:
        sites[key] = site
    return out
