"""What the coordinator asks a site and what the site answers: typed messages and their one encoding.

Torch-free (numpy and the standard library only), so a ClientApp process can read a message
without loading torch. Every transport carries the same encoding (:func:`encode`: a JSON header
and named numpy arrays): :class:`~hsl_lightning.flower.server.LocalSites` in process (the tests),
the site's worker over its Unix socket, and Flower's records (``ConfigRecord`` + ``ArrayRecord``).

Rounds are counted as the progress lines count them. A request carries ``completed``, the rounds
completed so far: a :class:`Round` hands the site the merged state after ``completed`` rounds, to
validate (that is round ``completed``'s validation) and to train round ``completed + 1`` from; a
:class:`Finish` hands it the deployed state, after ``completed`` rounds. Replies echo it, so a
reply to another request is refused instead of being added into the wrong round.

=========  ==================================  ===================================================
request    reply                               what the site does
=========  ==================================  ===================================================
Hello      HelloReply                          builds its data and model; reports sizes (and its mask key)
Keys       KeysReply                           secure aggregation: checks peers' keys, deals shares
Round      RoundReply                          validates and/or trains; sends its (masked) contribution
Recover    Recovered                           secure aggregation: shares of a dropped site's key
Finish     FinishReply                         tests the deployed round; writes its own model
Stop       Stopped                             the run ended (``reason``): frees its worker
any        Failure                             what went wrong, naming the site and the round
=========  ==================================  ===================================================
"""

from __future__ import annotations

import dataclasses
import json
import pickle
from dataclasses import dataclass, field

import numpy as np

from hsl_lightning.errors import HSLError

#: bumped when a message's meaning changes: a site and a coordinator of different versions refuse each other
VERSION = 2


def round_in_progress(completed: int, train: bool = True) -> int:
    """The round a request works on, numbered as the progress lines number it: training after
    ``completed`` rounds is round ``completed + 1``; validating the state after them is round
    ``completed``'s last step."""
    return completed + 1 if train else max(1, completed)


# ---------------------------------------------------------------------- requests (coordinator -> site)
@dataclass
class Hello:
    """Build the site (data, model) and report what the coordinator needs once."""

    completed: int = 0


@dataclass
class Round:
    """Load the state after ``completed`` rounds, holding ``merged``; validate it (``validate``) and
    train round ``completed + 1`` from it (``train``). ``extras``: round ``completed``'s summed
    strategy vectors (SCAFFOLD's server control variate); ``keep``: rounds whose state the site
    must keep (the deployed round so far); ``timeout_s``: how long the coordinator waits for this
    reply (the site's worker may stop after waiting that long for the next request)."""

    completed: int
    merged: np.ndarray
    validate: bool
    train: bool
    keep: list = field(default_factory=list)
    extras: np.ndarray | None = None
    timeout_s: float | None = None
    secagg: dict | None = None  # secure aggregation: peers' signed mask keys, shares for this site, active sites
    total_weight: float | None = None  # every trainee's merge weight summed (the fixed-point sum normalises by it)


@dataclass
class Keys:
    """Secure aggregation's set-up: check the peers' signed mask keys (``peers``), then deal shares of
    this site's mask-key secret and of its first round's self-mask seed (threshold ``threshold``)."""

    completed: int
    peers: list
    threshold: int


@dataclass
class Recover:
    """Secure aggregation after a dropout: this site's shares of the mask-key secrets of ``dropped``
    (sites that left round ``completed + 1`` after its masks were fixed)."""

    completed: int
    dropped: list


@dataclass
class Finish:
    """Test the deployed state (after ``completed`` rounds, holding ``merged``); write the site's own
    deployed model when ``write_weights`` (``info``: the checkpoint's metadata)."""

    completed: int
    merged: np.ndarray
    write_weights: bool
    info: dict = field(default_factory=dict)


@dataclass
class Stop:
    """The run has ended for this site (finished without it, failed, stopped): ``reason`` says why,
    in the coordinator's words."""

    completed: int
    reason: str


# ---------------------------------------------------------------------- replies (site -> coordinator)
@dataclass
class HelloReply:
    """A site's data report (sizes, class counts; never images) and its model's packing."""

    node: int
    name: str
    site: str
    report: dict
    in_chans: int
    size: int
    numel: int
    extras: int
    threads: int
    n_pool: int = 0
    external: dict | None = None
    secagg: dict | None = None  # its mask key for the run, signed with its node key
    busy_s: float = 0.0
    clock: dict | None = None
    statistics: dict | None = None  # its node's site statistics, when the run asks (data/statistics.py)


@dataclass
class KeysReply:
    """Encrypted shares, one per peer (``deal``: peer index -> blob), of a site's secrets."""

    node: int
    completed: int
    deal: dict
    busy_s: float = 0.0
    clock: dict | None = None


@dataclass
class Recovered:
    """A site's shares of dropped sites' mask-key secrets (``keys``: dropped index -> share)."""

    node: int
    completed: int
    keys: dict
    busy_s: float = 0.0
    clock: dict | None = None


@dataclass
class RoundReply:
    """A site's part of round ``completed + 1``: its aggregate validation metrics (``val``) and,
    when it trained, its contribution to the round's message. The contribution is either
    ``state`` (float32: its shared state divided by ``weight``) with ``weight`` and ``tail`` (the
    message's strategy vector, traffic, finished flags, weight), or the float64 ``vector`` itself."""

    node: int
    completed: int
    val: dict | None = None
    loss: float | None = None
    state: np.ndarray | None = None
    weight: float | None = None
    tail: np.ndarray | None = None
    vector: np.ndarray | None = None
    fixed: np.ndarray | None = None  # secure aggregation: the quantised contribution (uint64), masked
    update_norm: float | None = None
    error: str | None = None  # training failed after validation: the metrics count, the contribution is missing
    seeds: dict | None = None  # secure aggregation: its shares of the round's self-mask seeds (index -> share)
    deal: dict | None = None  # secure aggregation: encrypted shares of its next round's seed (peer -> blob)
    mask_s: float = 0.0  # secure aggregation: the site's time spent masking and dealing
    train_s: float = 0.0
    busy_s: float = 0.0
    clock: dict | None = None

    @property
    def trained(self) -> bool:
        """Whether the reply carries a contribution to the round's message."""
        return self.vector is not None or self.state is not None or self.fixed is not None

    def entries(self) -> int:
        """How many message entries the contribution covers."""
        return sum(len(a) for a in (self.vector, self.state, self.tail, self.fixed) if a is not None)


@dataclass
class FinishReply:
    """A site's scores of the deployed round: test metrics, validation counts at every threshold,
    the external site's AUC, and where it wrote its own model (``weights``)."""

    node: int
    completed: int
    test: dict
    thresholds: np.ndarray
    external: float | None = None
    peak_rss_mb: float = 0.0
    weights: str | None = None
    busy_s: float = 0.0
    clock: dict | None = None


@dataclass
class Stopped:
    """A site's answer to :class:`Stop`: whether a worker was running and stopped."""

    stopped: bool
    node: int | None = None
    busy_s: float = 0.0
    clock: dict | None = None


@dataclass
class Failure:
    """A request the site (or the transport) could not answer; ``error`` names the site and the round."""

    error: str
    node: int | None = None
    completed: int | None = None
    busy_s: float = 0.0
    clock: dict | None = None


REQUESTS = (Hello, Keys, Round, Recover, Finish, Stop)
REPLIES = (HelloReply, KeysReply, RoundReply, Recovered, FinishReply, Stopped, Failure)
_KINDS = {cls.__name__: cls for cls in REQUESTS + REPLIES}


# ---------------------------------------------------------------------- the encoding
def encode(message) -> tuple[str, dict[str, np.ndarray]]:
    """``message`` as (JSON header, named arrays): what every transport carries. Tensors are taken
    as numpy arrays (by duck typing: this module never imports torch)."""
    if type(message).__name__ not in _KINDS:
        raise HSLError(f"Not a message of the deployment protocol: {type(message).__name__}.")
    header, arrays = {"kind": type(message).__name__, "version": VERSION}, {}
    for f in dataclasses.fields(message):
        value = getattr(message, f.name)
        if hasattr(value, "detach"):  # a torch tensor
            value = value.detach().cpu().numpy()
        if isinstance(value, np.ndarray):
            arrays[f.name] = np.ascontiguousarray(value)
        else:
            header[f.name] = value
    return json.dumps(header), arrays


def decode(header: str, arrays: dict[str, np.ndarray]):
    """The message that :func:`encode` wrote; a header of another kind, version or shape is refused
    with one message."""
    try:
        fields = json.loads(header)
    except (TypeError, ValueError) as exc:
        raise HSLError(f"A deployment message could not be read ({exc}).") from exc
    kind, version = fields.pop("kind", None), fields.pop("version", None)
    if version != VERSION:
        raise HSLError(f"A deployment message of protocol version {version} reached a peer of version {VERSION}: "
                       "the coordinator and the sites run different hsl_lightning versions; install the same one.")
    cls = _KINDS.get(kind)
    if cls is None:
        raise HSLError(f"A deployment message of unknown kind {kind!r}.")
    fields.update({name: np.asarray(a) for name, a in arrays.items()})
    names = {f.name for f in dataclasses.fields(cls)}
    required = {f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    if set(fields) - names or required - set(fields):
        raise HSLError(f"A {kind} message with fields {sorted(fields)}; expected {sorted(names)} "
                       f"(required: {sorted(required)}).")
    return cls(**fields)


def to_bytes(message) -> bytes:
    """One message as bytes (the encoding, pickled): what the in-process sites pass, as the worker's socket does."""
    return pickle.dumps(encode(message), protocol=pickle.HIGHEST_PROTOCOL)


def from_bytes(data: bytes):
    """The message :func:`to_bytes` wrote."""
    header, arrays = pickle.loads(data)  # noqa: S301 - our own bytes, in process
    return decode(header, arrays)
