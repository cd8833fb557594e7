"""The KL-vs-LK study: ``python experiments/study/run.py --root=runs/study``.

Prepares the study's data once, trains every architecture with KL / L_alpha / L_lambda (plus the EAGLE-3
eta / lambda ablation and a second seed), evaluates tau at T = 0 and T = 1 on MT-bench, HumanEval and
GSM8K-style prompts, and writes ``docs/results.md`` with the JSON and PNGs behind it under
``docs/results/`` (see ``study.py`` and ``plan.py`` beside this file for the plan and its time budget).

Resumable: rerun the same command after a kill; finished steps are skipped, an interrupted training run
resumes from its last checkpoint, and the docs are regenerated after every step ("pending" cells for
what is not finished). Long runs, in the background:

  nohup nice python experiments/study/run.py --root=runs/study > runs/study.log 2>&1 &

Flags:
  --root       study directory (state, data, per-run train workdirs and evaluation outputs)
  --plan       plan config, path[:args] (``experiments/study/plan.py``, ``experiments/study/plan.py:gpu``, ``:tiny``)
  --only       comma-separated run-name patterns or architectures (``eagle3``, ``*.kl.*``)
  --max_hours  launch no new step after this many hours (this invocation); rerun to continue
  --docs_dir   where ``<name>.md`` and ``<name>/`` go (default: the plan's, ``docs``)
  --dry_run    print the run list and the time estimate, run nothing
  --docs_only  regenerate the docs from what is finished under --root, run nothing
  --measure    time one train step per architecture and one evaluation prompt (for the budget)
"""
from __future__ import annotations

import os
import sys

# The repository root, so the entry point works from a plain checkout too (no pip install -e).
_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, _REPO)

from absl import app, flags

flags.DEFINE_string("root", "runs/study", "Study directory (state, data, runs).")
flags.DEFINE_string("plan", os.path.join(_REPO, "experiments", "study", "plan.py"), "Plan config, path[:args].")
flags.DEFINE_string("only", "", "Comma-separated run-name patterns or architectures (default: all).")
flags.DEFINE_float("max_hours", None, "Launch no new step after this many hours of this invocation.")
flags.DEFINE_string("docs_dir", None, "Directory of <name>.md and <name>/ (default: the plan's docs.dir).")
flags.DEFINE_bool("dry_run", False, "Print the run list and the time estimate; run nothing.")
flags.DEFINE_bool("docs_only", False, "Regenerate the docs from the finished outputs under --root.")
flags.DEFINE_bool("measure", False, "Time one train step per architecture and one eval prompt.")
FLAGS = flags.FLAGS
EFFECTIVE_CORES = 1.7  # what the study gets of a 2-core machine it has to itself (system, I/O)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  import study
  from lkjax.config_args import load_config_module
  module, arg = load_config_module(FLAGS.plan)
  plan = module.get_config(arg)
  runs = study.select_runs(study.build_runs(plan), FLAGS.only or None)
  if FLAGS.dry_run:
    for i, r in enumerate(runs):
      print(f"{i + 1:2d} {r.name:32s} K={r.num_draft} groups={','.join(r.groups)}")
    measured = getattr(module, "MEASURED", {})
    if plan.variant != "cpu":
      print(f"note: MEASURED holds the 2-core CPU unit costs; for the {plan.variant} variant re-run --measure "
            "on its machine and read the estimate below as a CPU-only figure")
    for label, cores in (("as measured (shared machine)", None),
                         (f"machine to itself ({EFFECTIVE_CORES} effective cores)", EFFECTIVE_CORES)):
      est = study.estimate_seconds(plan, runs, measured, effective_cores=cores)
      print(f"estimate, {label}: " + ("not measured (run --measure)" if est is None else
                                      ", ".join(f"{k} {v / 3600:.2f} h" for k, v in est.items())))
    return
  if FLAGS.docs_only:
    out = study.regenerate_docs(plan, FLAGS.root, FLAGS.docs_dir)
    print(f"[study] docs: {out['markdown']}")
    return
  if FLAGS.measure:
    study.time_costs(plan, FLAGS.root, archs=sorted({r.arch for r in runs}))
    return
  out = study.run_study(plan, FLAGS.root, only=FLAGS.only or None, max_hours=FLAGS.max_hours,
                        docs_dir=FLAGS.docs_dir, argv=sys.argv)
  if out["failed"]:
    print(f"[study] failed steps (rerun to retry): {out['failed']}", flush=True)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
