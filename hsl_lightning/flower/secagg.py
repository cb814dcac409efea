"""Secure aggregation: the coordinator learns the sum of the sites' contributions and nothing else.

After Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving Machine Learning" (CCS
2017), with the per-run key agreement of SecAgg+ (Bell et al., CCS 2020) on a complete graph (a
consortium has a handful of sites). Each site's contribution is already a vector of int64 (the
fixed-point message of :mod:`hsl_lightning.federation.fixedpoint`); it is sent as

    y_i = q_i + PRG(b_i) + sum over peers j of (+PRG(k_ij) if i < j else -PRG(k_ij))   (mod 2^64)

- ``k_ij``: a pairwise key, X25519 agreement between site i's and site j's mask keys through
  HKDF-SHA256, bound to the run; PRG: the ChaCha20 keystream under that key, 8 bytes per entry
  (``cryptography``'s ChaCha20, nonce = the round). The pairwise masks cancel in the sum.
- ``b_i``: a fresh 32-byte self-mask seed per round from ``os.urandom``.
- Each site's mask key is signed with its node key (the ECDSA key the SuperLink authenticates it
  by) and checked by every peer against the consortium's public keys, so a coordinator cannot put
  a key of its own between two sites.
- Shamir shares (threshold t of n, over the prime field 2^521 - 1) of each site's mask-key secret
  (once per run) and of its next round's self-mask seed travel through the coordinator encrypted
  for their recipient (ChaCha20-Poly1305 under a second pairwise key).
- Unmasking: with every training reply a site also returns its shares of the round's self-mask
  seeds, so the coordinator rebuilds each ``b_i`` and removes ``PRG(b_i)`` without a further round
  trip. Only when a site dropped after the masks were fixed does the coordinator ask the others for
  their shares of the dropped site's mask-key secret (one more exchange), rebuild its pairwise
  masks and remove them.

What it protects: a coordinator that follows the protocol sees uniform-looking vectors and their
sum. Each site refuses what would open its own reply: masking with itself alone or with too few
sites, a threshold below two thirds, unknown, duplicated or revoked keys, revealing key shares for
a site it did not mask with (``SiteMasks.check_round``, ``accept``, ``reveal_keys``), and a fresh
mask key per coordinator session means nothing of an earlier session is used again. What it does
not protect: because every site returns its shares of the round's self-mask seeds with its reply
(no extra exchange), the coordinator holds both kinds of shares for a site that dropped after
masking; if that site's reply then arrives late, or if the coordinator falsely declares it dropped,
the coordinator can unmask that one reply (Bonawitz's protocol avoids both with one more exchange
per round, about 6 s on Flower's transport). The site is then listed as dropped in the run's
summary and told so by an honest coordinator. Different lists of active sites sent to different
sites are not detected (Bonawitz's signed consistency round is not implemented). A coalition of the
coordinator with t sites learns everything t shares open.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import secrets
import struct
from pathlib import Path

import numpy as np
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from hsl_lightning.errors import HSLError

#: the prime field of the Shamir shares (a Mersenne prime above any 32-byte secret)
PRIME = 2 ** 521 - 1
#: a site's name as the consortium's key folder holds it (``<name>.pub``): no path, no leading dot
NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def threshold(sites: int) -> int:
    """t: how many shares open a secret: two thirds of the sites, at least 2 (at most n - 1 can be lost)."""
    return max(2, math.ceil(2 * sites / 3)) if sites > 2 else sites


# ---------------------------------------------------------------------- primitives
def prg(key: bytes, length: int, nonce: int) -> np.ndarray:
    """``length`` uniform uint64 from the ChaCha20 keystream under ``key`` (32 bytes) and ``nonce``."""
    cipher = Cipher(algorithms.ChaCha20(key, struct.pack("<QQ", 0, nonce)), mode=None)
    stream = cipher.encryptor().update(bytes(8 * length))
    return np.frombuffer(stream, dtype="<u8").astype(np.uint64, copy=False)


def split(secret: bytes, t: int, n: int) -> list[tuple[int, int]]:
    """Shamir shares ``(x, y)``, x = 1..n, of ``secret``: any t of them give it back, fewer nothing."""
    coefficients = [int.from_bytes(secret, "big")] + [secrets.randbelow(PRIME) for _ in range(t - 1)]
    return [(x, sum(c * pow(x, k, PRIME) for k, c in enumerate(coefficients)) % PRIME) for x in range(1, n + 1)]


def combine(shares: list[tuple[int, int]], size: int = 32) -> bytes:
    """The secret of ``size`` bytes behind ``shares`` (Lagrange interpolation at 0)."""
    secret = 0
    for i, (xi, yi) in enumerate(shares):
        num, den = 1, 1
        for j, (xj, _) in enumerate(shares):
            if i != j:
                num, den = num * -xj % PRIME, den * (xi - xj) % PRIME
        secret = (secret + yi * num * pow(den, -1, PRIME)) % PRIME
    if secret >= 2 ** (8 * size):
        raise HSLError("Secure aggregation: the shares of a secret do not agree (a site sent a wrong share).")
    return secret.to_bytes(size, "big")


def _hkdf(material: bytes, run_id: str, info: bytes) -> bytes:
    return HKDF(hashes.SHA256(), 32, salt=run_id.encode(), info=info).derive(material)


def pair_keys(private: X25519PrivateKey, peer_public: bytes, run_id: str, a: int, b: int) -> tuple[bytes, bytes]:
    """(mask key, share key) of the pair of sites {a, b}: the same at both ends."""
    shared = private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    pair = f"{min(a, b)}-{max(a, b)}".encode()
    return _hkdf(shared, run_id, b"hsl-secagg mask " + pair), _hkdf(shared, run_id, b"hsl-secagg share " + pair)


def statement(run_id: str, node: int, name: str, key: bytes) -> bytes:
    """What a site signs: its mask key for this run, as site ``name`` at index ``node``."""
    return b"hsl-secagg-v1\0" + json.dumps([run_id, node, name, key.hex()]).encode()


def sign(node_key: Path, message: bytes) -> bytes:
    """``message`` signed with the site's node key (OpenSSH ECDSA, as ``hsl flower keys`` makes it)."""
    try:
        key = serialization.load_ssh_private_key(Path(node_key).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise HSLError(f"Secure aggregation signs the site's mask key with its node key, and {node_key} cannot be "
                       f"read as one ({exc}).") from exc
    return key.sign(message, ec.ECDSA(hashes.SHA384()))


def verify(roster: Path, name: str, message: bytes, signature: bytes) -> None:
    """Check that site ``name``'s node key (``roster/<name>.pub``) signed ``message``."""
    path = Path(roster) / f"{name}.pub"
    if not path.is_file():
        raise HSLError(f"Secure aggregation: site {name!r} is not in the consortium's public keys ({roster} has no "
                       f"{name}.pub): it may be an impostor, or the key list is out of date.")
    key = serialization.load_ssh_public_key(path.read_bytes())
    try:
        key.verify(signature, message, ec.ECDSA(hashes.SHA384()))
    except (InvalidSignature, TypeError, ValueError) as exc:
        raise HSLError(f"Secure aggregation: the mask key announced for site {name!r} is not signed by its node key "
                       f"({path}): someone between the sites substituted it. The run is refused.") from exc


# ---------------------------------------------------------------------- a site's side
class SiteMasks:
    """One site's part of the protocol for one run; what must survive a restart lives in ``folder``."""

    def __init__(self, folder: Path, node: int, name: str, run_id: str, node_key: Path | None, roster: Path | None):
        if node_key is None or roster is None:
            raise HSLError(f"Site {name}: secure aggregation needs the site's node key and the consortium's public "
                           "keys: node config node-key=\"PATH\" (hsl flower supernode sets it from "
                           "--auth-supernode-private-key) and consortium-keys=\"FOLDER\" (every site's <name>.pub, as "
                           "hsl flower keys writes them). Or set federation.secure_aggregation: false.")
        self.folder, self.node, self.name, self.run_id = Path(folder), node, name, run_id
        self.node_key, self.roster = Path(node_key), Path(roster)
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / "secagg.key"  # this coordinator session's key: a restarted worker finds it again
        self._use(X25519PrivateKey.from_private_bytes(path.read_bytes()) if path.is_file() else self._fresh_key())
        revoked = self.folder / "revoked.json"
        self.revoked: set[str] = set(json.loads(revoked.read_text())) if revoked.is_file() else set()

    def _use(self, key: X25519PrivateKey) -> None:
        self.private = key
        self.public = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        self.peers: dict[int, dict] = {}  # node -> {"name", "key", "mask", "share"}

    def _fresh_key(self) -> X25519PrivateKey:
        key, path = X25519PrivateKey.generate(), self.folder / "secagg.key"
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                      serialization.NoEncryption()))
        tmp.replace(path)
        return key

    def advert(self) -> dict:
        """A fresh mask key for this coordinator session (a resumed run gets new pair keys, so no pad,
        share nonce or revealed key of an earlier session is used again), signed with the node key."""
        self._use(self._fresh_key())
        (self.folder / "active.json").unlink(missing_ok=True)  # a new session may bring back a dropped site
        signature = sign(self.node_key, statement(self.run_id, self.node, self.name, self.public))
        return {"node": self.node, "name": self.name, "key": self.public.hex(), "signature": signature.hex(),
                "run": self.run_id}

    def accept(self, adverts: list[dict]) -> None:
        """Check every peer's signed mask key against the consortium's public keys; derive the pair keys.
        Refused: a name used twice or not a plain file name, another key for this site or for a peer
        already accepted, a key whose secret this site helped reveal."""
        names = [str(a["name"]) for a in adverts]
        if len(set(names)) != len(names) or any(not NAME.fullmatch(n) for n in names):
            raise HSLError(f"Site {self.name}: the peers' mask keys name sites {names}: each site must appear once, "
                           "by its plain name. The coordinator's list is refused.")
        for advert in adverts:
            node = int(advert["node"])
            if node == self.node:
                if advert["key"] != self.public.hex() or advert["name"] != self.name:
                    raise HSLError(f"Site {self.name}: the coordinator announced another mask key or name for this "
                                   "site. Refused.")
                continue
            if node in self.peers:
                if self.peers[node]["key"] != advert["key"] or self.peers[node]["name"] != advert["name"]:
                    raise HSLError(f"Site {self.name}: site {node}'s mask key changed within the run. Refused.")
                continue
            if advert["key"] in self.revoked:
                raise HSLError(f"Site {self.name}: site {node} announced a mask key whose secret was revealed when it "
                               "dropped out. Refused.")
            key = bytes.fromhex(advert["key"])
            verify(self.roster, advert["name"], statement(self.run_id, node, advert["name"], key),
                   bytes.fromhex(advert["signature"]))
            mask, share = pair_keys(self.private, key, self.run_id, self.node, node)
            self.peers[node] = {"name": advert["name"], "key": advert["key"], "mask": mask, "share": share}

    # ------------------------------------------------------------------ shares
    def _nonce(self, kind: int, completed: int, sender: int, receiver: int) -> bytes:
        return struct.pack("<BIHHx", kind, completed, sender, receiver)[:12].ljust(12, b"\0")

    def deal(self, completed: int, t: int, with_key: bool) -> dict[str, str]:
        """Shares of a fresh self-mask seed for the round after ``completed`` rounds (and, ``with_key``,
        of the mask-key secret), one encrypted blob per peer; this site's own share is kept."""
        seed = os.urandom(32)
        (self.folder / f"seed-{completed + 1:04d}.bin").write_bytes(seed)
        nodes = sorted([self.node, *self.peers])
        secret = self.private.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                            serialization.NoEncryption())
        seed_shares = dict(zip(nodes, split(seed, t, len(nodes))))
        key_shares = dict(zip(nodes, split(secret, t, len(nodes)))) if with_key else {}
        out = {}
        for node in nodes:
            payload = {"seed": seed_shares[node], **({"key": key_shares[node]} if with_key else {})}
            if node == self.node:
                self._store(completed + 1, self.node, payload)
                continue
            blob = json.dumps(payload).encode()
            aead = ChaCha20Poly1305(self.peers[node]["share"])
            out[str(node)] = aead.encrypt(self._nonce(1, completed + 1, self.node, node), blob,
                                          self.run_id.encode()).hex()
        return out

    def receive(self, round_no: int, inbox: dict[str, str]) -> None:
        """Decrypt and keep the shares that peers dealt to this site for round ``round_no``."""
        for sender, blob in inbox.items():
            sender = int(sender)
            if sender not in self.peers:
                raise HSLError(f"Site {self.name}: a share from site {sender}, which announced no signed mask key.")
            try:
                plain = ChaCha20Poly1305(self.peers[sender]["share"]).decrypt(
                    self._nonce(1, round_no, sender, self.node), bytes.fromhex(blob), self.run_id.encode())
            except InvalidTag as exc:
                raise HSLError(f"Site {self.name}: the share from site {sender} for round {round_no} does not "
                               "decrypt: it was altered on the way.") from exc
            self._store(round_no, sender, json.loads(plain))

    def _store(self, round_no: int, sender: int, payload: dict) -> None:
        path = self.folder / f"shares-{round_no:04d}.json"
        held = json.loads(path.read_text()) if path.is_file() else {}
        held[str(sender)] = payload
        path.write_text(json.dumps(held))
        if "key" in payload:  # the mask-key secret's shares serve the whole run
            keys = self.folder / "key-shares.json"
            kept = json.loads(keys.read_text()) if keys.is_file() else {}
            kept[str(sender)] = payload["key"]
            keys.write_text(json.dumps(kept))

    # ------------------------------------------------------------------ masking
    def check_round(self, round_no: int, active: list[int], t: int) -> None:
        """The coordinator chooses who takes part in a round and the threshold: this site refuses a choice
        that would open its contribution (itself missing, unknown or revoked sites, fewer sites than the
        threshold, a threshold below two thirds of the sites, more sites than the last round)."""
        known = set(self.peers) | {self.node}
        floor = threshold(len(known))
        last = self.folder / "active.json"
        before = json.loads(last.read_text()) if last.is_file() else None
        why = ("this site is not among them" if self.node not in active else
               "some have no signed mask key here" if not set(active) <= known else
               f"a threshold of {t}, below {floor}" if t < floor else
               f"{len(active)} sites, fewer than the threshold {floor}" if len(active) < floor else
               "more sites than the last round" if before and before[0] < round_no and not set(active) <= set(before[1])
               else "a site whose key was revealed" if any(self.peers[n]["key"] in self.revoked for n in active
                                                           if n != self.node) else None)
        if why is not None:
            raise HSLError(f"Site {self.name} refuses to mask round {round_no} with sites {sorted(active)}: {why}. A "
                           "coordinator following the protocol never asks this.")
        last.write_text(json.dumps([round_no, sorted(active)]))

    def mask(self, quantised: np.ndarray, round_no: int, active: list[int]) -> np.ndarray:
        """``quantised`` (uint64) plus this round's self mask and the pairwise masks with the active peers."""
        path = self.folder / f"seed-{round_no:04d}.bin"
        if not path.is_file():
            raise HSLError(f"Site {self.name}: no self-mask seed for round {round_no} (its shares were never dealt); "
                           "the coordinator must deal keys before the round.")
        y = quantised.astype(np.uint64, copy=True)
        y += prg(path.read_bytes(), len(y), 0)
        for node in active:
            if node == self.node:
                continue
            if node not in self.peers:
                raise HSLError(f"Site {self.name}: site {node} is in round {round_no} without a signed mask key.")
            pad = prg(self.peers[node]["mask"], len(y), round_no)
            if self.node < node:
                y += pad
            else:
                y -= pad
        return y

    def reveal_seeds(self, round_no: int, active: list[int]) -> dict[str, list]:
        """This site's shares of the round's self-mask seeds of the ``active`` sites (itself included)."""
        path = self.folder / f"shares-{round_no:04d}.json"
        held = json.loads(path.read_text()) if path.is_file() else {}
        return {str(node): held[str(node)]["seed"] for node in active if str(node) in held}

    def reveal_keys(self, dropped: list[int], round_no: int) -> dict[str, list]:
        """This site's shares of the mask-key secrets of sites that dropped from round ``round_no`` after
        the masks were fixed (only sites that round was masked with); their keys are revoked here."""
        last = self.folder / "active.json"
        masked_with = json.loads(last.read_text()) if last.is_file() else [None, []]
        if masked_with[0] != round_no or not set(dropped) <= set(masked_with[1]) - {self.node}:
            raise HSLError(f"Site {self.name} refuses to reveal key shares of sites {sorted(dropped)} for round "
                           f"{round_no}: it masked that round with {masked_with[1]} (round {masked_with[0]}).")
        path = self.folder / "key-shares.json"
        held = json.loads(path.read_text()) if path.is_file() else {}
        self.revoked |= {self.peers[n]["key"] for n in dropped if n in self.peers}
        (self.folder / "revoked.json").write_text(json.dumps(sorted(self.revoked)))
        return {str(node): held[str(node)] for node in dropped if str(node) in held}


# ---------------------------------------------------------------------- the coordinator's side
def unmask(total: np.ndarray, round_no: int, run_id: str, replied: list[int], dropped: list[int],
           seeds: dict[int, list], keys: dict[int, list], adverts: dict[int, dict], t: int) -> np.ndarray:
    """The sum of the replied sites' quantised contributions, from the sum of their masked replies
    ``total``: each replied site's self mask removed (its seed from ``seeds``: shares by site), and
    the pairwise masks between a dropped site and the replied ones (its mask-key secret from ``keys``)."""
    out = total.astype(np.uint64, copy=True)
    for node in replied:
        shares = [tuple(s) for s in seeds.get(node, [])]
        if len(shares) < t:
            raise HSLError(f"Secure aggregation: too few shares of site {node}'s self mask in round {round_no} to "
                           "remove it.")
        out -= prg(combine(shares), len(out), 0)
    for dead in dropped:
        shares = [tuple(s) for s in keys.get(dead, [])]
        if len(shares) < t:
            raise HSLError(f"Secure aggregation: site {dead} dropped in round {round_no} and only {len(shares)} of the "
                           f"{t} shares needed to remove its masks came back; the round cannot be summed.")
        secret = X25519PrivateKey.from_private_bytes(combine(shares))
        for node in replied:
            mask, _ = pair_keys(secret, bytes.fromhex(adverts[node]["key"]), run_id, dead, node)
            pad = prg(mask, len(out), round_no)
            if node < dead:  # the replied site added +pad for the pair, the dropped one would have subtracted it
                out -= pad
            else:
                out += pad
    return out


class CoordinatorMasks:
    """The coordinator's side: it relays the signed mask keys and the encrypted shares, sums the masked
    replies and removes the masks; it never holds a site's unmasked contribution."""

    def __init__(self, adverts: dict[int, dict]):
        runs = {a.get("run") for a in adverts.values()}
        if len(runs) != 1:
            raise HSLError("Secure aggregation: the sites announced mask keys for different runs (their run configs "
                           "differ); every site must run the same hsl-config.")
        self.adverts, self.run_id = dict(adverts), runs.pop()
        self.t = threshold(len(adverts))
        self.inbox: dict[int, dict[str, str]] = {}  # receiver -> {sender: encrypted share} for the next round

    def peers(self) -> list[dict]:
        """Every site's signed mask key, as each site checks them."""
        return [self.adverts[i] for i in sorted(self.adverts)]

    def take_deals(self, replies: dict[int, object]) -> None:
        """Route the shares the sites dealt (for the next round) to their recipients."""
        self.inbox = {}
        for sender, reply in replies.items():
            for receiver, blob in (getattr(reply, "deal", None) or {}).items():
                self.inbox.setdefault(int(receiver), {})[str(sender)] = blob

    def request_field(self, site: int, active: list[int]) -> dict:
        """What a site's training request carries: the peers' keys, its shares, the active sites, t."""
        return {"peers": self.peers(), "inbox": self.inbox.get(site, {}), "active": sorted(active), "threshold": self.t}

    def total(self, replies: dict[int, object], round_no: int, active: list[int], recover) -> np.ndarray:
        """The sum of the quantised contributions of the sites that replied (int64), from their masked
        replies; ``recover(dropped)`` asks the others for shares of dropped sites' mask-key secrets."""
        replied = sorted(replies)
        masked = np.zeros(len(next(iter(replies.values())).fixed), dtype=np.uint64)
        seeds: dict[int, list] = {}
        for node in replied:
            masked += np.asarray(replies[node].fixed, dtype=np.uint64)
            for owner, share in (replies[node].seeds or {}).items():
                seeds.setdefault(int(owner), []).append(share)
        dropped = sorted(set(active) - set(replied))
        keys: dict[int, list] = {}
        if dropped:
            for answer in recover(dropped).values():
                for owner, share in (getattr(answer, "keys", None) or {}).items():
                    keys.setdefault(int(owner), []).append(share)
        plain = unmask(masked, round_no, self.run_id, replied, dropped, seeds, keys, self.adverts, self.t)
        return plain.view(np.int64)


def run_id_of(config_text: str) -> str:
    """The run's identity in every derived key and signature: a digest of its configuration."""
    return hashlib.sha256(config_text.encode()).hexdigest()[:32]
