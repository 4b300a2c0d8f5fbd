"""Hand mutations of the code, each caught (or not) by the tests named with it.

Each mutation is defined by what it does: an exact piece of source (or a regular expression) that must
occur exactly once in its file, and what replaces it. The tree is copied to a temporary folder (without
.git and caches), the one change is made there, and the named tests run there with `pytest -x -q`. A
mutation is caught when a test fails (pytest's exit code 1); "pattern not found" means the code has
changed under the mutation, which then needs rewriting here.

    python .ci/mutate.py                 # every mutation, one line each
    python .ci/mutate.py M9a M13         # only these
    python .ci/mutate.py --list          # names, files and tests, without running anything
    python .ci/mutate.py --check         # that every pattern still occurs exactly once
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# name, file, what it does, old (exact text, or re:PATTERN), new, tests (pytest node ids)
MUTATIONS = [
    # the seven that slipped through before the tests of issue 24
    (
        "M9a",
        "data.py",
        "image-folder crop resampled BILINEAR instead of BICUBIC",
        "[size, size], v2.InterpolationMode.BICUBIC)",
        "[size, size], v2.InterpolationMode.BILINEAR)",
        ["test_data.py::test_folder_views_equal_v2_bicubic_antialiased_crop_and_flip"],
    ),
    (
        "M9b",
        "data.py",
        "image-folder flip the other way round",
        "if u[v, 22] < 0.5:  # flip p 0.5",
        "if u[v, 22] >= 0.5:  # flip p 0.5",
        ["test_data.py::test_folder_views_equal_v2_bicubic_antialiased_crop_and_flip"],
    ),
    (
        "M10c",
        "decorr.py",
        "bad images counted as distinct paths per batch, not every replacement",
        "seen_bad += len(bad)",
        "seen_bad += len(set(bad))",
        ["test_data.py::test_training_on_folder_with_unreadable_images"],
    ),
    (
        "M11",
        "decorr.py",
        "the default predictor keeps nn.Linear's random init (W = I only with --identity-predictor)",
        'if args.identity_predictor or args.predictor_init == "identity":',
        "if args.identity_predictor:",
        ["test_cli.py::test_default_predictor_starts_at_identity"],
    ),
    (
        "M12",
        "lineval.py",
        "lineval --mode linear never steps its optimiser",
        "            loss.backward()\n            opt.step()\n            step += 1\n",
        "            loss.backward()\n            step += 1\n",
        ["test_lineval.py::test_linear_mode_learns"],
    ),
    (
        "M13",
        "decorr.py",
        "lr scaled by batch/512 instead of batch/256",
        "return args.lr * args.batch_size / 256",
        "return args.lr * args.batch_size / 512",
        ["test_cli.py::test_lr_schedule_exact"],
    ),
    # the loss
    (
        "inv-targets",
        "decorr.py",
        "invariance term against the own view (p1 - f1) instead of the other",
        "inv = (p1 - t2).pow(2).mean() + (p2 - t1).pow(2).mean()",
        "inv = (p1 - t1).pow(2).mean() + (p2 - t2).pow(2).mean()",
        ["test_decorr.py::test_decorr_loss_matches_algorithm1"],
    ),
    (
        "cov-coef-D",
        "decorr.py",
        "covariance term not divided by D",
        "loss = inv_coef * inv + cov_coef / D * cov\n    return loss, inv, cov",
        "loss = inv_coef * inv + cov_coef * cov\n    return loss, inv, cov",
        ["test_decorr.py::test_decorr_loss_matches_algorithm1"],
    ),
    (
        "gram-backward",
        "decorr.py",
        "GramSquare's backward 2 W (W^T W) instead of 4",
        "return 4 * ctx.scale * grad * (w[:, ctx.lo : ctx.hi] @ block)",
        "return 2 * ctx.scale * grad * (w[:, ctx.lo : ctx.hi] @ block)",
        ["test_decorr.py::test_gram_square_symmetric_backward_and_shards"],
    ),
    (
        "parts-gram",
        "decorr.py",
        "the Gram form sums the parts instead of averaging them",
        "cov = cov + gram * world / (parts * m * m)",
        "cov = cov + gram * world / (m * m)",
        ["test_decorr.py::test_decorr_loss_matches_algorithm1"],
    ),
    (
        "parts-dxd",
        "decorr.py",
        "the D x D form sums the parts instead of averaging them",
        "cov = cov + (c[rows] / m - wtw).pow(2).sum() * world / parts",
        "cov = cov + (c[rows] / m - wtw).pow(2).sum() * world",
        ["test_decorr.py::test_decorr_loss_matches_algorithm1"],
    ),
    (
        "stopgrad-loss",
        "decorr.py",
        "decorr_loss ignores stopgrad",
        "t1, t2 = f1.detach(), f2.detach()",
        "t1, t2 = f1, f2",
        ["test_decorr.py::test_lemma_3_2_gradients"],
    ),
    (
        "std-eps",
        "decorr.py",
        "standardize without BatchNorm's eps",
        "return (f - mean) / torch.sqrt(var + eps)",
        "return (f - mean) / torch.sqrt(var)",
        ["test_decorr.py::test_standardize_equals_batchnorm"],
    ),
    (
        "std-unbiased",
        "distributed.py",
        "standardize with the unbiased variance (BatchNorm normalises with the biased one)",
        "var = global_sum((x - per_channel(mean, x.dim())).pow(2).mean(dims)) / world",
        "var = global_sum((x - per_channel(mean, x.dim())).pow(2).sum(dims) / (x.shape[0] - 1)) / world",
        ["test_decorr.py::test_standardize_equals_batchnorm"],
    ),
    (
        "allreduce-backward",
        "distributed.py",
        "AllReduce's backward passes the local gradient instead of the sum over ranks",
        "return AllReduce.forward(ctx, grad, ctx.group), None",
        "return grad, None",
        ["test_decorr.py::test_distributed_equals_single_process"],
    ),
    # Table 3's flags in the model
    (
        "no-std-ignored",
        "decorr.py",
        "--no-std ignored: the features are always standardized",
        "        if not args.no_std:\n",
        "        if True:\n",
        ["test_cli.py::test_table3_flags_reach_the_model"],
    ),
    (
        "stopgrad-not-passed",
        "decorr.py",
        "--stopgrad not passed from the model to decorr_loss",
        "return decorr_loss(f1, f2, w, args.partitions, args.inv_coef, args.cov_coef, args.stopgrad)",
        "return decorr_loss(f1, f2, w, args.partitions, args.inv_coef, args.cov_coef)",
        ["test_cli.py::test_table3_flags_reach_the_model"],
    ),
    (
        "identity-trained",
        "decorr.py",
        "--identity-predictor leaves W trainable",
        "self.predictor.weight.requires_grad_(not args.identity_predictor)",
        "self.predictor.weight.requires_grad_(True)",
        ["test_cli.py::test_identity_predictor_stays_identity"],
    ),
    # LARS and the schedule
    (
        "lars-eta",
        "decorr.py",
        "LARS without its trust coefficient eta",
        'trust = torch.where(both_positive, group["eta"] * param_norms / grad_norms, 1.0)',
        "trust = torch.where(both_positive, param_norms / grad_norms, 1.0)",
        ["test_decorr.py::test_lars_steps_match_hand_computation"],
    ),
    (
        "lars-all-groups",
        "decorr.py",
        "LARS's weight decay and trust ratio on biases and BatchNorm too",
        '            if group["lars"]:\n',
        "            if True:\n",
        ["test_decorr.py::test_lars_steps_match_hand_computation"],
    ),
    (
        "lars-momentum",
        "decorr.py",
        "LARS without momentum",
        'torch._foreach_mul_(momenta, group["momentum"])',
        "torch._foreach_mul_(momenta, 0.0)",
        ["test_decorr.py::test_lars_steps_match_hand_computation"],
    ),
    (
        "warmup-uncapped",
        "decorr.py",
        "warm-up not capped at a tenth of the run",
        "warmup = min(args.warmup_epochs * steps_per_epoch, total // 10)",
        "warmup = args.warmup_epochs * steps_per_epoch",
        ["test_cli.py::test_lr_schedule_exact"],
    ),
    # resume, signals, the log
    (
        "resume-optimizer",
        "decorr.py",
        "resume does not restore LARS's momentum",
        '        opt.load_state_dict(ckpt["optimizer"])\n',
        "",
        ["test_cli.py::test_resume_equals_uninterrupted"],
    ),
    (
        "resume-scaler",
        "decorr.py",
        "resume does not restore the fp16 GradScaler",
        '        scaler.load_state_dict(ckpt["scaler"])\n',
        "",
        ["test_cli.py::test_fp16_scaler_checkpointed_and_resumed"],
    ),
    (
        "cut-line-kept",
        "data.py",
        "a line cut by a crash is read on resume",
        'return [json.loads(line) for line in lines if line.endswith("}")]',
        "return [json.loads(line) for line in lines if line]",
        ["test_cli.py::test_sigusr1_stops_and_a_cut_line_is_dropped_on_resume"],
    ),
    (
        "sigusr1-ignored",
        "decorr.py",
        "SIGTERM and SIGUSR1 caught but ignored",
        "    def stop(number, frame):\n        received.append(number)",
        "    def stop(number, frame):\n        pass",
        ["test_cli.py::test_sigusr1_stops_and_a_cut_line_is_dropped_on_resume"],
    ),
    (
        "stop-per-rank",
        "decorr.py",
        "each rank decides to stop on its own signal alone",
        "    loss_value, *values, bad_images, stopping = stats.tolist()\n",
        "    loss_value, *values, bad_images, stopping = stats.tolist()\n    stopping = bool(stop)\n",
        ["test_cli.py::test_stop_decided_on_two_ranks"],
    ),
    (
        "collapse-flag",
        "decorr.py",
        "the progress line never flags a collapse",
        'if collapsing(values["feat_std"], values["eff_rank_proj"]):',
        "if False:",
        ["test_cli.py::test_collapse_flag_in_progress_line"],
    ),
    # SimSiam, BYOL and the bridge (issue 20)
    (
        "ema-skipped",
        "decorr.py",
        "BYOL's target never follows the online network",
        "        if raw_model.target is not None:  # BYOL eq. 1",
        "        if False:  # BYOL eq. 1",
        ["test_baselines.py::test_target_follows_the_online_network_by_tau"],
    ),
    (
        "ema-tau-step",
        "decorr.py",
        "tau taken one step late",
        "tau = byol_tau(step, total, args.tau_base)",
        "tau = byol_tau(step + 1, total, args.tau_base)",
        ["test_baselines.py::test_target_follows_the_online_network_by_tau"],
    ),
    (
        "frozen-bn-trains",
        "distributed.py",
        "CPU SyncBatchNorm makes BYOL's frozen target BatchNorm parameters trainable",
        "parameter.requires_grad_(getattr(child, name_in_bn).requires_grad)",
        "parameter.requires_grad_(True)",
        ["test_decorr.py::test_sync_batchnorm_keeps_frozen_parameters_frozen"],
    ),
    (
        "fixed-lr-ignored",
        "decorr.py",
        "--fix-pred-lr leaves the predictor on the schedule",
        'group["lr"] = group.get("fixed_lr", lr)',
        'group["lr"] = lr',
        ["test_decorr.py::test_fix_pred_lr_keeps_the_predictors_lr"],
    ),
    (
        "lars-clip-ignored",
        "decorr.py",
        "--lars-clip does nothing",
        'if group["clip"] and group["lr"] > 0:',
        'if False and group["lr"] > 0:',
        ["test_decorr.py::test_lars_clip_matches_hand_computation"],
    ),
    (
        "simsiam-projector",
        "decorr.py",
        "SimSiam gets the plain projector (no BatchNorm1d(affine=False) at its end)",
        'if args.loss == "simsiam":\n            self.projector = simsiam_projector(dim, dims)',
        "if False:\n            self.projector = simsiam_projector(dim, dims)",
        ["test_decorr.py::test_model_heads_per_method"],
    ),
    (
        "bridge-unstandardized",
        "decorr.py",
        "decorr's bridge measured on the raw projection, not the standardized one W sees",
        'if args.loss == "decorr" and not args.no_std:',
        "if False:",
        ["test_decorr.py::test_bridge_in_diagnostics_by_hand"],
    ),
    (
        "loss-scale-ignored",
        "decorr.py",
        "--loss-scale does nothing",
        "            loss = loss * self.args.loss_scale",
        "            loss = loss * 1.0",
        ["test_decorr.py::test_loss_scale_scales_the_loss_not_its_terms"],
    ),
    (
        "sgd-no-decay-on-bn",
        "decorr.py",
        "SGD without weight decay on biases and BatchNorm (not SimSiam's recipe)",
        "        groups = [dict(params=params)]",
        "        groups = [dict(params=params[:1]), dict(params=params[1:], weight_decay=0.0)]",
        ["test_decorr.py::test_sgd_decays_every_parameter"],
    ),
    # the in-memory augmentation
    (
        "crop-scale",
        "data.py",
        "RandomResizedCrop's smallest area 0.16 instead of 0.08",
        "def crop_boxes(u, H, W, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):",
        "def crop_boxes(u, H, W, scale=(0.16, 1.0), ratio=(3 / 4, 4 / 3)):",
        ["test_data.py::test_crop_boxes_equal_torchvision_loop_exactly"],
    ),
    (
        "batch-flip",
        "data.py",
        "the batched crop flips the other images",
        "flip = (u[:, 22] < 0.5).to(x.device, non_blocking=True)",
        "flip = (u[:, 22] >= 0.5).to(x.device, non_blocking=True)",
        ["test_data.py::test_flip_rate"],
    ),
    # the order of the images and the evaluation transform
    (
        "order-epoch",
        "data.py",
        "the images' order the same every epoch (seeded by the seed alone)",
        "order = torch.randperm(len(train), generator=seeded(args.seed, epoch))",
        "order = torch.randperm(len(train), generator=seeded(args.seed, 0))",
        ["test_data.py::test_order_is_a_new_permutation_every_epoch_from_seed_and_epoch"],
    ),
    (
        "eval-resize",
        "data.py",
        "the evaluation transform resizes to the crop size, not size * 256 / 224",
        "steps.append(v2.Resize(size * 256 // 224, antialias=True))",
        "steps.append(v2.Resize(size, antialias=True))",
        ["test_data.py::test_eval_transform_resizes_to_size_times_256_224_then_crops_the_centre"],
    ),
    # issues 28 and 29: the fair protocol, the calibrated floor, one run per folder, Ctrl-C
    (
        "warmup-not-from-zero",
        "decorr.py",
        "--warmup-steps starts at lr base/N, not 0",
        "reached = step if from_zero else step + 1",
        "reached = step + 1",
        ["test_cli.py::test_warmup_steps_schedule_exact"],
    ),
    (
        "lock-not-taken",
        "data.py",
        "a run does not lock its --out",
        "        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)",
        "        pass",
        ["test_cli.py::test_a_second_run_on_a_held_folder_is_refused"],
    ),
    (
        "ctrl-c-no-abort",
        "decorr.py",
        "a second Ctrl-C waits for the checkpoint like the first",
        "        if signal.SIGINT in received:\n            raise KeyboardInterrupt",
        "        if False:\n            raise KeyboardInterrupt",
        ["test_cli.py::test_a_second_ctrl_c_aborts_at_once"],
    ),
    (
        "val-image-silent",
        "decorr.py",
        "the diagnostics' batch replaces an unreadable image without a word",
        "                unreadable.extend(bad)",
        "                pass",
        ["test_data.py::test_an_unreadable_val_image_is_reported"],
    ),
    (
        "bn-momentum-kept",
        "lineval.py",
        "the random network's BatchNorm statistics a running average (momentum 0.1), not the passes' mean",
        "        m.momentum = None  # a cumulative mean over the passes",
        "        pass",
        ["test_lineval.py::test_random_init_estimates_batchnorm_first"],
    ),
    (
        "full-not-final",
        "lineval.py",
        "a row marked full for a checkpoint before the run's last step",
        "full=not args.random_init and final and default_protocol(args, run),",
        "full=not args.random_init and default_protocol(args, run),",
        ["test_lineval.py::test_eval_jsonl_marks_what_a_row_is"],
    ),
    (
        "choice-worst",
        "compare.py",
        "the grid's lr with the worst held-out probe chosen",
        "return -max(finished)[1] if finished else None",
        "return -min(finished)[1] if finished else None",
        ["test_compare.py::test_the_choice_is_the_best_held_out_probe"],
    ),
    (
        "key-without-budget",
        "compare.py",
        "a row keyed without the run's budget and seed (the first flags only)",
        "        key = digest(train_flags, probe_flags)\n        if key in self.rows:",
        "        key = digest(train_flags[:2], probe_flags)\n        if key in self.rows:",
        ["test_compare.py::test_a_row_is_keyed_by_its_budget_and_a_stopped_run_resumes"],
    ),
]


def apply(tree, file, old, new):
    """Make the change in tree/file; an error message if the pattern does not occur exactly once."""
    path = tree / file
    text = path.read_text()
    if old.startswith("re:"):
        count = len(re.findall(old[3:], text, flags=re.M))
        changed = re.sub(old[3:], new, text, count=1, flags=re.M)
    else:
        count = text.count(old)
        changed = text.replace(old, new, 1)
    if count != 1:
        return "pattern not found" if count == 0 else f"pattern found {count} times"
    path.write_text(changed)
    return None


def copy_tree(dest):
    ignore = shutil.ignore_patterns(".git", "__pycache__", ".pytest_cache", ".ruff_cache", "out", "gpu_out")
    shutil.copytree(ROOT, dest, ignore=ignore, symlinks=True)


def run(mutation, keep):
    name, file, _, old, new, tests = mutation
    started = time.time()
    with tempfile.TemporaryDirectory(prefix=f"mutate-{name}-") as tmp:
        tree = Path(tmp) / "tree"
        copy_tree(tree)
        error = apply(tree, file, old, new)
        if error:
            return name, error, "", time.time() - started
        cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
        env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
        p = subprocess.run(cmd, cwd=tree, capture_output=True, text=True, env=env)
        failed = re.findall(r"^FAILED (\S+)", p.stdout, flags=re.M)
        if keep:
            (ROOT / f"mutate-{name}.log").write_text(p.stdout + p.stderr)
    if p.returncode == 1:
        return name, "caught", failed[0] if failed else "?", time.time() - started
    if p.returncode == 0:
        return name, "NOT caught", "", time.time() - started
    return (
        name,
        f"error (pytest exit {p.returncode})",
        p.stdout.strip().splitlines()[-1:],
        time.time() - started,
    )


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("names", nargs="*", help="mutations to run (default: all)")
    parser.add_argument("--list", action="store_true", help="list the mutations and their tests")
    parser.add_argument("--check", action="store_true", help="only check that each pattern occurs once")
    parser.add_argument("--keep-logs", action="store_true", help="write pytest's output to mutate-NAME.log")
    args = parser.parse_args()
    known = {m[0]: m for m in MUTATIONS}
    unknown = [n for n in args.names if n not in known]
    if unknown:
        parser.error(f"unknown mutation(s) {', '.join(unknown)}; --list shows them")
    chosen = [known[n] for n in args.names] if args.names else MUTATIONS
    if args.list:
        for name, file, what, _, _, tests in chosen:
            print(f"{name:20s} {file:11s} {what}\n{'':32s} {' '.join(tests)}")
        return 0
    if args.check:
        bad = 0
        for name, file, _, old, _, _ in chosen:
            text = (ROOT / file).read_text()
            count = len(re.findall(old[3:], text, flags=re.M)) if old.startswith("re:") else text.count(old)
            if count != 1:
                bad += 1
                print(f"{name:20s} {file}: pattern {'not found' if count == 0 else f'found {count} times'}")
        print(f"{len(chosen) - bad} of {len(chosen)} patterns occur exactly once")
        return 1 if bad else 0
    results = []
    for mutation in chosen:
        name, verdict, test, seconds = run(mutation, args.keep_logs)
        results.append(verdict)
        print(
            f"{name:20s} {verdict:12s} {test if isinstance(test, str) else ' '.join(test)}  {seconds:.0f} s"
        )
        sys.stdout.flush()
    caught = results.count("caught")
    print(f"{caught} of {len(results)} mutations caught")
    return 0 if caught == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
