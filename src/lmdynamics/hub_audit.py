"""Pre-flight hub audit: what the hub serves for every planned revision, before any weight.

For every (size, seed, step) a configuration needs, and for ``main`` of each repo, one
request, ``HfApi.model_info(repo, revision, files_metadata=True)`` (huggingface_hub's public
API: the commit and, per file, its size and LFS sha256), gives what each revision's weights
are without downloading a byte of them; this is how the suites' own trackers found their
defects (EleutherAI/pythia #205: "LFS sha256 of model.safetensors, via the HF API";
allenai/OLMo #915: "verifiable without downloading via the tree API"). Revisions are then
grouped by content (:func:`decide`):

- **file level**: revisions whose weight files are the same blobs (same sha256 set);
- **shard level**: revisions that share one weight file but not all (#206: pythia-12b
  step50000 and step58000 serve the final checkpoint's first shard); the shard index, a small
  JSON file, names the tensors of such a shard.

A revision is defective (:data:`lmdynamics.defects.KINDS`) when it has no weights (#202),
serves ``main``'s weights without being the final step (#205: 76 pythia-2.8b branches), the
final step's, step 0's (a non-zero step; #83, #198), another analysed step's (all of them:
at most one of a group can be what its step says, and nothing tells which), or shares a shard
with another revision. The final step is the reference of every comparison and is never
flagged; step 0 is kept as the initialisation when only later steps repeat it. Known defects
of the suite definition (``known_defects``) are reported beside the hashes' verdict, never
instead of it: a defect fixed upstream stops being flagged.

Writes ``tables/hub_audit.csv`` (:data:`COLUMNS`, one row per planned revision and one per
repo's ``main``), which the download jobs read to fetch a blob several revisions share only
once (:class:`lmdynamics.sources.blobs.SharedBlobs`) and the content audit folds into
``tables/defective.csv``.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from lmdynamics import defects
from lmdynamics.config import hub_repo, hub_revision, resolved_seeds, suite_for
from lmdynamics.sources.hub import HubError, weight_files, with_retries
from lmdynamics.store import write_text_atomic

log = logging.getLogger(__name__)

#: Columns of ``tables/hub_audit.csv``.
COLUMNS: tuple[str, ...] = (
    "size", "seed", "step", "repo", "revision", "commit", "weight_files", "weights_bytes",
    "file_group", "same_content_as", "same_as_main", "same_as_final", "shared_shards",
    "no_weights", "defective", "kind", "reason", "known_defects")
#: Revision name of the finished model, audited beside the steps of every repo.
MAIN = "main"
#: Requests in flight at once.
CONCURRENCY = 8


@dataclass
class RevisionFiles:
    """What the hub lists for one revision: commit, and per weight file (name, sha256,
    bytes); ``problem`` says why there are no usable weights (then ``files`` is empty)."""

    repo: str
    revision: str
    commit: str = ""
    files: tuple[tuple[str, str, int], ...] = ()
    index: str | None = None
    problem: str = ""

    @property
    def content(self) -> tuple[str, ...] | None:
        """The file-level content: the sorted sha256 of its weight files (None: no weights)."""
        return tuple(sorted(sha for _, sha, _ in self.files)) or None

    @property
    def bytes(self) -> int:
        return sum(n for _, _, n in self.files)


@dataclass
class Planned:
    """One revision the configuration analyses (``step`` None: the repo's ``main``)."""

    size: str
    seed: int
    step: int | None
    files: RevisionFiles
    known: list = field(default_factory=list)

    @property
    def label(self) -> str:
        return MAIN if self.step is None else f"step{self.step}"


class Counter:
    """Requests made (thread-safe), for the measurement of the audit's cost."""

    def __init__(self) -> None:
        self.n = 0
        self._lock = threading.Lock()

    def add(self, k: int = 1) -> None:
        with self._lock:
            self.n += k


def revision_files(repo: str, revision: str, *, retries: int = 5, backoff: float = 2.0,
                   counter: Counter | None = None) -> RevisionFiles:
    """One ``model_info(files_metadata=True)`` request: the commit and the weight files'
    LFS sha256 and sizes (:func:`lmdynamics.sources.hub.weight_files` picks the layout). A
    revision without a usable weight layout is returned with ``problem`` set, not raised."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    api = HfApi()
    if counter is not None:
        counter.add()
    try:
        info = with_retries(
            lambda: api.model_info(repo, revision=revision, files_metadata=True,
                                   timeout=constants.HF_HUB_ETAG_TIMEOUT),
            what=f"{repo}@{revision}: file metadata", retries=retries, backoff=backoff)
    except (RevisionNotFoundError, RepositoryNotFoundError) as exc:
        what = "revision" if isinstance(exc, RevisionNotFoundError) else "repository"
        return RevisionFiles(repo, revision, problem=f"the {what} does not exist on the hub")
    siblings = {s.rfilename: s for s in info.siblings or []}
    out = RevisionFiles(repo, revision, commit=info.sha or "")
    try:
        names, _, index = weight_files(siblings)
    except HubError as exc:
        out.problem = str(exc)
        return out
    files = []
    for name in names:
        s = siblings[name]
        if s.lfs is None or not re.fullmatch(r"[0-9a-f]{64}", str(s.lfs.sha256)):
            out.problem = (f"{name} is not stored with git LFS (no sha256 in the hub's file "
                           "metadata); its content cannot be compared without downloading it")
            return out
        files.append((name, str(s.lfs.sha256), int(s.lfs.size)))
    out.files, out.index = tuple(files), index
    return out


def shard_tensors(repo: str, commit: str, index: str, shard: str, *, retries: int,
                  backoff: float, counter: Counter | None = None) -> list[str]:
    """The tensors of ``shard`` by the revision's shard index (a small JSON file, no
    weights)."""
    from huggingface_hub import hf_hub_download

    if counter is not None:
        counter.add()
    with tempfile.TemporaryDirectory() as tmp:
        path = with_retries(lambda: hf_hub_download(repo, index, revision=commit, local_dir=tmp),
                            what=f"{repo}@{commit[:12]}: {index}", retries=retries,
                            backoff=backoff)
        try:
            weight_map = json.loads(Path(path).read_text(encoding="utf-8"))["weight_map"]
        except (ValueError, KeyError, TypeError):
            return []
    return sorted(k for k, v in weight_map.items() if v == shard) \
        if isinstance(weight_map, dict) else []


def _short_steps(labels: Iterable[str], limit: int = 8) -> str:
    labels = list(labels)
    shown = ", ".join(labels[:limit])
    return shown + (f", ... ({len(labels)} in all)" if len(labels) > limit else "")


def decide(run: list[Planned], final_step: int) -> dict[int, tuple[str, str]]:
    """step -> (kind, reason) of the defective planned revisions of one run (one size and
    seed; ``run`` holds its planned steps and its ``main``). See the module docstring for the
    rules; the final step is never flagged, step 0 only when it repeats main or the final
    step or is repeated by a step of a group it does not anchor."""
    steps = [p for p in run if p.step is not None]
    main = next((p for p in run if p.step is None), None)
    final = next((p for p in steps if p.step == final_step), None)
    by_content: dict[tuple[str, ...], list[Planned]] = defaultdict(list)
    for p in run:
        if p.files.content is not None:
            by_content[p.files.content].append(p)
    step0 = next((p for p in steps if p.step == 0), None)
    out: dict[int, tuple[str, str]] = {}
    for p in steps:
        if p.files.content is None:
            out[p.step] = ("no_weights", f"{p.files.repo}@{p.files.revision} has no weights on "
                           f"the hub ({p.files.problem})")
            continue
        if p is final:
            continue
        group = [q for q in by_content[p.files.content] if q is not p]
        sha = ", ".join(s[:12] for s in p.files.content)
        if main is not None and main in group:
            also = " and the final step" if final is not None and final in group else ""
            out[p.step] = ("same_as_main", f"serves the same weights as main{also} "
                           f"(sha256 {sha}...)")
        elif final is not None and final in group:
            out[p.step] = ("same_as_final", f"serves the same weights as the final step "
                           f"{final_step} (sha256 {sha}...)")
        elif group and step0 is not None and p is not step0 and step0 in group \
                and not any(q is main or q is final for q in group):
            out[p.step] = ("same_as_step0", f"serves the same weights as step 0 "
                           f"(sha256 {sha}...)")
        elif group and not (p is step0 and all(q.step is not None for q in group)):
            out[p.step] = ("shared_content", "serves the same weights as "
                           f"{_short_steps(q.label for q in group)} (sha256 {sha}...)")
    by_shard: dict[str, list[Planned]] = defaultdict(list)
    for p in run:
        for _, sha, _ in p.files.files:
            by_shard[sha].append(p)
    for p in steps:
        if p.step in out or p is final or p.files.content is None:
            continue
        shared = [(name, [q for q in by_shard[sha]
                          if q is not p and q.files.content != p.files.content])
                  for name, sha, _ in p.files.files]
        shared = [(name, others) for name, others in shared if others]
        if shared:
            text = "; ".join(f"{name} is also served by "
                             f"{_short_steps(q.label for q in others)}"
                             for name, others in shared)
            out[p.step] = ("shared_shard", text)
    return out


def plan_revisions(config: Mapping[str, Any], refs: Callable[[str], list[str]] | None = None
                   ) -> list[tuple[str, int, str, list[tuple[int | None, str]]]]:
    """(size, seed, repo, [(step, revision name), ..., (None, "main")]) of every run the
    config analyses; a discover suite's branch names come from ``refs(repo)``
    (``list_repo_refs``)."""
    from lmdynamics.plan import hub_refs

    suite = suite_for(config)
    steps = sorted(config["steps"])
    out = []
    for size in config["sizes"]:
        for seed in resolved_seeds(config):
            repo = hub_repo(config, suite, size, seed)
            names = [hub_revision(config, suite, s) for s in steps]
            if None in names:
                found = suite.step_refs((refs or hub_refs)(repo))
                missing = [s for s in steps if s not in found]
                if missing:
                    raise HubError(f"{repo} has no branch for step(s) {missing[:5]} matching "
                                   f"{suite.revisions['pattern']!r}")
                names = [found[s] for s in steps]
            out.append((size, seed, repo, [*zip(steps, names, strict=True), (None, MAIN)]))
    return out


@dataclass
class AuditResult:
    """The audit's table (:data:`COLUMNS`), the requests it made and its wall time."""

    table: pd.DataFrame
    requests: int
    seconds: float

    @property
    def defective(self) -> pd.DataFrame:
        return self.table[self.table["defective"]]

    def revision_bytes(self, repo: str, revision: str) -> int:
        """Bytes of the weights of ``repo@revision`` (for :func:`lmdynamics.sources.plan`)."""
        rows = self.table[(self.table.repo == repo) & (self.table.revision == revision)]
        return int(rows.weights_bytes.iloc[0]) if len(rows) else 0

    def findings(self) -> list[str]:
        """The audit's findings, one line each (what ``lmdynamics plan`` prints)."""
        lines = []
        for (size, seed), part in self.table.groupby(["size", "seed"], sort=False):
            bad = part[part["defective"]]
            for kind, rows in bad.groupby("kind", sort=False):
                steps = ", ".join(str(int(s)) for s in rows["step"])
                known = sorted(set(re.findall(r"\((https://\S+)\)",
                                              " ".join(rows["known_defects"]))))
                confirmed = f"; known defect confirmed: {', '.join(known)}" if known else ""
                lines.append(f"{size} seed {seed}: {len(rows)} revision(s) {kind} "
                             f"({defects.KINDS[kind]}): steps {steps}{confirmed}")
            unseen = part[(part["known_defects"] != "") & ~part["defective"]]
            for row in unseen.itertuples():
                lines.append(f"{size} seed {seed} step {row.step}: known defect "
                             f"{row.known_defects}: not seen in the hashes (fixed upstream?)")
        return lines


def audit(config: Mapping[str, Any], *, refs: Callable[[str], list[str]] | None = None,
          fetch: Callable[..., RevisionFiles] = revision_files) -> AuditResult:
    """Audit every planned revision of a hub ``config`` (checked, with the defaults of the
    ``hub`` section) and return the table; nothing is written."""
    t0 = time.perf_counter()
    suite = suite_for(config)
    hub = config.get("hub") or {}
    retries, backoff = hub.get("retries", 5), hub.get("backoff", 2.0)
    counter = Counter()
    runs = plan_revisions(config, refs=refs if refs is not None else _counted_refs(counter))
    jobs = [(size, seed, repo, step, name) for size, seed, repo, revs in runs
            for step, name in revs]

    def one(job):
        size, seed, repo, step, name = job
        return fetch(repo, name, retries=retries, backoff=backoff, counter=counter)

    with ThreadPoolExecutor(CONCURRENCY) as pool:
        fetched = list(pool.map(one, jobs))
    planned: dict[tuple[str, int], list[Planned]] = defaultdict(list)
    for (size, seed, repo, step, _), files in zip(jobs, fetched, strict=True):
        known = []
        if step is not None and suite.repo_id(size, seed if suite.seeds else None) == repo:
            known = suite.defects_of(size, seed, step)
        planned[(size, seed)].append(Planned(size, seed, step, files, known))
    rows = []
    for run in planned.values():
        verdict = decide(run, config["final_step"])
        rows += _rows(run, verdict, config["final_step"], retries, backoff, counter)
    table = pd.DataFrame(rows, columns=list(COLUMNS))
    return AuditResult(table, counter.n, time.perf_counter() - t0)


def _counted_refs(counter: Counter) -> Callable[[str], list[str]]:
    from lmdynamics.plan import hub_refs

    def refs(repo: str) -> list[str]:
        counter.add()
        return hub_refs(repo)
    return refs


def _rows(run: list[Planned], verdict: dict[int, tuple[str, str]], final_step: int,
          retries: int, backoff: float, counter: Counter) -> list[dict]:
    main = next((p for p in run if p.step is None), None)
    final = next((p for p in run if p.step == final_step), None)
    groups: dict[tuple[str, ...], str] = {}
    for p in sorted(run, key=lambda q: (q.step is None, q.step or 0)):
        if p.files.content is not None and p.files.content not in groups:
            groups[p.files.content] = f"G{len(groups) + 1}"
    by_shard: dict[str, list[Planned]] = defaultdict(list)
    for p in run:
        for _, sha, _ in p.files.files:
            by_shard[sha].append(p)
    rows = []
    for p in run:
        content = p.files.content
        same = [q.label for q in run if q is not p and content is not None
                and q.files.content == content]
        shards = []
        if len(p.files.files) > 1:
            for name, sha, _ in p.files.files:
                others = [q.label for q in by_shard[sha] if q is not p
                          and q.files.content != content]
                if others:
                    tensors = shard_tensors(p.files.repo, p.files.commit, p.files.index, name,
                                            retries=retries, backoff=backoff,
                                            counter=counter) if p.files.index else []
                    named = (f"; tensors {_short_steps(tensors, 4)}" if tensors else "")
                    shards.append(f"{name}: {', '.join(others)}{named}")
        kind, reason = verdict.get(p.step, ("", "")) if p.step is not None else ("", "")
        rows.append({
            "size": p.size, "seed": p.seed, "step": "" if p.step is None else p.step,
            "repo": p.files.repo, "revision": p.files.revision, "commit": p.files.commit,
            "weight_files": ";".join(f"{n}={sha}" for n, sha, _ in p.files.files),
            "weights_bytes": p.files.bytes,
            "file_group": groups.get(content, "") if content is not None else "",
            "same_content_as": ";".join(same),
            "same_as_main": bool(main is not None and p is not main and content is not None
                                 and main.files.content == content),
            "same_as_final": bool(final is not None and p is not final and content is not None
                                  and final.files.content == content),
            "shared_shards": " | ".join(shards),
            "no_weights": content is None,
            "defective": bool(kind), "kind": kind,
            "reason": reason or (p.files.problem if p.step is None and content is None
                                 else ""),
            "known_defects": "; ".join(d.describe() for d in p.known),
        })
    return rows


def write_audit(result: AuditResult, out: Path | str) -> None:
    """Write ``tables/hub_audit.csv``."""
    write_text_atomic(result.table.to_csv(index=False), out)


def read_audit(path: Path | str) -> pd.DataFrame:
    """``tables/hub_audit.csv`` as written by :func:`write_audit`."""
    table = pd.read_csv(path, dtype={"size": str, "step": str, "weight_files": str},
                        keep_default_na=False)
    missing = [c for c in COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(f"{path}: not a hub audit table (missing columns {missing}); rerun "
                         "the hub_audit rule")
    for name in ("defective", "no_weights", "same_as_main", "same_as_final"):
        table[name] = table[name].astype(str).str.lower() == "true"
    return table


def defect_rows(table: pd.DataFrame) -> list[dict]:
    """The defective planned revisions of a hub audit table as rows of
    ``tables/defective.csv`` (:data:`lmdynamics.defects.COLUMNS`)."""
    rows = []
    for row in table[table["defective"] & (table["step"].astype(str) != "")].itertuples():
        source = " ".join(re.findall(r"\((https://\S+)\)", row.known_defects))
        rows.append({"size": row.size, "seed": int(row.seed), "step": int(row.step),
                     "audit": "hub", "kind": row.kind, "detail": row.reason,
                     "evidence": f"hub commit {row.commit[:12]}; {row.weight_files}",
                     "source": source})
    return rows


def enforce(table: pd.DataFrame, policy: str) -> None:
    """Stop the run when it cannot go on: a planned revision without weights (no policy can
    analyse it), or any defective one under ``audit.defective: fail``; one line each way."""
    defects.check_policy(policy)
    steps = table[table["step"].astype(str) != ""]
    empty = steps[steps["no_weights"]]
    if len(empty):
        listed = "; ".join(f"{r.size} seed {r.seed} step {r.step}: {r.reason}"
                           for r in empty.itertuples())
        raise defects.DefectiveRevisionsError(
            f"no usable weights on the hub for {len(empty)} planned revision(s): {listed}; no "
            "policy can analyse a revision without weights: remove those steps (or seeds) "
            "from the config")
    bad = steps[steps["defective"]]
    if policy == "fail" and len(bad):
        raise defects.DefectiveRevisionsError(defects.fail_line(defects.frame(
            defect_rows(bad)), "the pre-flight hub audit"))


def known_defect_lines(config: Mapping[str, Any]) -> list[str]:
    """The known defects of the suite definition (``known_defects``) that name planned
    revisions of the definition's own repos, one line each."""
    suite = suite_for(config)
    lines = []
    for defect in suite.known_defects:
        for size in config["sizes"]:
            for seed in resolved_seeds(config):
                own = suite.repo_id(size, seed if suite.seeds else None)
                steps = [s for s in sorted(config["steps"]) if defect.covers(size, seed, s)]
                if steps and hub_repo(config, suite, size, seed) == own:
                    shown = ", ".join(map(str, steps))
                    lines.append(f"{size} seed {seed} steps {shown}: known defect "
                                 f"{defect.describe()}")
    return lines


def audit_report(config: Mapping[str, Any], *, online: bool
                 ) -> tuple[list[str], Callable[[str, str], int] | None]:
    """What ``lmdynamics plan`` prints about the revisions: online, the pre-flight audit's
    findings (and the weights' bytes from its metadata, for the plan's download column);
    offline, the known defects of the suite definition, which only the hashes can confirm."""
    if config["source"] != "hub":
        return [], None
    if not online:
        known = known_defect_lines(config)
        return ([f"known defects of the suite definition ({len(known)}; not checked offline: "
                 "the run's pre-flight hub audit decides from the hashes):",
                 *(f"  {line}" for line in known)] if known else []), None
    try:
        result = audit(config)
    except Exception as exc:  # the plan stands without the audit; say why
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return [f"hub audit not done ({type(exc).__name__}: {text[:160]})"], None
    findings = result.findings()
    head = (f"hub audit of {len(result.table)} revisions ({result.requests} metadata requests, "
            f"{result.seconds:.1f} s, no weights downloaded): "
            f"{len(result.defective)} flagged")
    return [head, *(f"  {line}" for line in findings)], result.revision_bytes
