"""The volume policy: which volume new media goes to, in Koji's rule shape.

One rule per line, ``TEST [ARGS] [&& TEST [ARGS] ...] :: VOLUME``, first
match wins; ``!`` before a test negates it, ``#`` starts a comment. Tests:

- ``all`` — always matches;
- ``pool GLOB...`` — the pool's path of names (``tenants/acme``) matches a glob;
- ``name GLOB...`` — the file name matches a glob;
- ``group NAME...`` — the creator belongs to one of these groups;
- ``user NAME...`` — the creator is one of these users.

For the API the creator is the authenticated API user and its groups; for the
mount, the Unix user and group of the creating process.

As in Koji, a policy that does not parse, names an unknown volume, or matches
nothing puts media on DEFAULT (with a warning), so a broken policy never
stops media from being created.

A rule whose volume is offline (its disk is not there, ``service.presence``)
is passed over: the next matching rule places the media. When none is left,
the create is refused (VolumeOffline) rather than sent to DEFAULT, whose disk
the operator did not choose for it.
"""

from __future__ import annotations

import fnmatch
import logging
import shlex
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from velocityfs.catalog.models import DEFAULT_VOLUME
from velocityfs.errors import InvalidValue, VolumeOffline

log = logging.getLogger(__name__)

DEFAULT_POLICY = "all :: DEFAULT"


@dataclass(frozen=True)
class Subject:
    """What a policy may look at when new media is created."""

    pool_path: str
    name: str
    user: str | None = None
    groups: frozenset[str] = field(default_factory=frozenset)


@dataclass(frozen=True)
class Test:
    kind: str
    args: tuple[str, ...]
    negated: bool

    def matches(self, subject: Subject) -> bool:
        result = _TESTS[self.kind](subject, self.args)
        return not result if self.negated else result

    def __str__(self) -> str:
        return ("!" if self.negated else "") + " ".join((self.kind, *self.args))


@dataclass(frozen=True)
class Rule:
    line: int
    tests: tuple[Test, ...]
    volume: str

    def matches(self, subject: Subject) -> bool:
        return all(t.matches(subject) for t in self.tests)

    def __str__(self) -> str:
        return " && ".join(map(str, self.tests)) + f" :: {self.volume}"


def _globs(value: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(value, p) for p in patterns)


_TESTS: dict[str, Callable[[Subject, tuple[str, ...]], bool]] = {
    "all": lambda s, a: True,
    "pool": lambda s, a: _globs(s.pool_path, a),
    "name": lambda s, a: _globs(s.name, a),
    "group": lambda s, a: bool(s.groups & set(a)),
    "user": lambda s, a: s.user is not None and s.user in a,
}


def parse(text: str) -> list[Rule]:
    """Parse a policy; raise InvalidValue naming the line that is wrong."""
    rules = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if "::" not in line:
            raise InvalidValue(f"policy line {number}: missing ':: VOLUME' in {raw.strip()!r}")
        condition, _, volume = line.rpartition("::")
        volume = volume.strip()
        if not volume or " " in volume:
            raise InvalidValue(f"policy line {number}: one volume name expected after '::'")
        tests = []
        for part in condition.split("&&"):
            words = shlex.split(part)
            if not words:
                raise InvalidValue(f"policy line {number}: empty test")
            negated = words[0].startswith("!")
            kind = words[0].lstrip("!") or (words[1] if len(words) > 1 else "")
            args = tuple(words[1:] if words[0] != "!" else words[2:])
            if kind not in _TESTS:
                raise InvalidValue(f"policy line {number}: unknown test {kind!r}")
            if kind != "all" and not args:
                raise InvalidValue(f"policy line {number}: test {kind!r} needs an argument")
            tests.append(Test(kind, args, negated))
        rules.append(Rule(number, tuple(tests), volume))
    return rules


@dataclass(frozen=True)
class Decision:
    """The volume chosen, and why (``volume policy check`` prints this)."""

    volume: str
    reason: str


class VolumePolicy:
    """A parsed policy checked against the known volumes at decision time."""

    def __init__(self, text: str = DEFAULT_POLICY) -> None:
        self.text = text
        try:
            self.rules: list[Rule] | None = parse(text)
            self.error: str | None = None
        except InvalidValue as exc:
            self.rules, self.error = None, str(exc)
            log.warning("volume policy is broken (%s): media goes to DEFAULT", exc)

    def decide(
        self,
        subject: Subject,
        volumes: Callable[[], Iterable[str]],
        offline: Callable[[str], str | None] = lambda _volume: None,
    ) -> Decision:
        """First matching rule's volume that is online; ``volumes`` is asked only for a
        non-DEFAULT one, and ``offline`` (why a volume is offline, or None) for a known one."""
        if self.rules is None:
            return Decision(DEFAULT_VOLUME, f"policy is broken ({self.error}): DEFAULT")
        skipped: list[str] = []
        for rule in self.rules:
            if rule.matches(subject):
                if rule.volume != DEFAULT_VOLUME and rule.volume not in set(volumes()):
                    log.warning(
                        "volume policy line %d names unknown volume %r: DEFAULT used",
                        rule.line,
                        rule.volume,
                    )
                    return Decision(
                        DEFAULT_VOLUME,
                        f"line {rule.line} ({rule}) names unknown volume {rule.volume!r}: DEFAULT",
                    )
                reason = offline(rule.volume)
                if reason is not None:
                    skipped.append(
                        f"line {rule.line} passed over: volume '{rule.volume}' is offline: {reason}"
                    )
                    continue
                return Decision(rule.volume, "; ".join([f"line {rule.line}: {rule}", *skipped]))
        if skipped:
            raise VolumeOffline(
                f"no volume for new media '{subject.name}' in pool '{subject.pool_path}': "
                + "; ".join(skipped)
                + ", and no later rule matches"
            )
        log.warning("volume policy matched nothing for %s: DEFAULT used", subject)
        return Decision(DEFAULT_VOLUME, "no rule matched: DEFAULT")
