"""A training run on one rank: builds the mesh, model, engine, data, checkpointer and telemetry from the training
config, resumes, and runs the step loop (see trainer/train.py for the step and resume contracts).

Decisions:

* Checkpoint storage outages (trainer/checkpoint/outage.py): a save that fails because the storage cannot be
  written does not end the run. Each step's sync point carries, besides the stop flag, three checkpoint flags
  (the save in flight has finished, a retry is due, the outage limit has passed), all-reduced with "any", so
  every rank settles the finished save, retries, or gives up at the same step: a failed asynchronous save is
  noticed at the next step boundary, and the ranks never disagree about calling the (collective) save.
* During an outage the interval saves give way to retries of the newest state on the backoff schedule. At the
  end of training, or when the limit passes, nothing newer than the last commit is lost silently: the run
  retries until the final step commits, or exits with EXIT_STORAGE_UNAVAILABLE, every rank's last log line
  naming the checkpoint path (the controller's StorageUnavailable).
* A SIGTERM during an outage still exits EXIT_PREEMPTED: the resumed job starts from the last committed step.
* While it waits for the storage after the last step it reports the outage every STORAGE_WAIT_REPORT_S, which
  the controller's hang check counts as a sign of life (the trainer's own limit bounds the wait).
* In-place recovery (trainer/recovery/, when the launcher gives a recovery store): after every step the rank's
  state is snapshotted into host memory; the sync point also agrees on the committed snapshot step (MIN). A
  collective that fails because a peer is gone does not end the run: the rank regroups in the same process
  (`_regroup`: new groups, the engine rebound, the checkpoint group anew, the committed snapshot restored with
  the data position and RNGs) and goes on. A spare joins as a newcomer: it builds everything in `__enter__` with
  the collectives the survivors' rebind issues, then restores from the replica its keeper sends. When some rank's
  state is in no memory the run exits EXIT_RECOVERY_FALLBACK and the controller resumes from the disk checkpoint.
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path

import torch

from trainer.checkpoint import CheckpointConfig, Checkpointer, capture_rng, restore_rng
from trainer.checkpoint.chunk import LocalChunk
from trainer.contract.telemetry import (
    ENV_METRICS_HOST,
    EXIT_PREEMPTED,
    EXIT_RECOVERY_FALLBACK,
    EXIT_STORAGE_UNAVAILABLE,
    STORAGE_UNAVAILABLE,
)
from trainer.contract.training import TrainingConfig
from trainer.data.dataset import ConcatSource, CorpusSource, DatasetConfig, JsonlDataset
from trainer.data.image import ImageProcessorConfig
from trainer.data.loader import LoaderConfig, PackedLoader
from trainer.data.packing import PackingConfig
from trainer.data.storage import StorageConfig
from trainer.data.text_corpus import TextCorpus
from trainer.data.video import VideoConfig
from trainer.faults import FaultConfig, FaultInjector, GracefulStop
from trainer.models.qwen2_vl import Qwen2VL, from_pretrained, preset
from trainer.parallel.config import EngineConfig, OptimizerConfig
from trainer.parallel.engine import ParallelEngine
from trainer.parallel.mesh import ParallelDims, destroy_distributed, init_distributed
from trainer.recovery.inplace import InPlace, Membership, RecoverySettings, is_peer_failure
from trainer.recovery.warmup import warm_up
from trainer.telemetry.mfu import MfuConfig, MfuMeter
from trainer.telemetry.rank import RankTelemetry, TelemetryConfig
from trainer.telemetry.timers import sync_flags, sync_values

log = logging.getLogger("trainer.train")
STORAGE_WAIT_REPORT_S = 2.0  # while waiting for the checkpoint storage after the last step, report this often


class Run:
    def __init__(self, config: TrainingConfig):
        self.config = config
        self.run_dir = Path(config.run_dir)

    # ------------------------------------------------------------------------------------------ building

    def __enter__(self) -> Run:
        cfg = self.config
        p = cfg.parallel
        settings = RecoverySettings.from_env(
            os.environ,
            snapshot_interval=cfg.recovery.snapshot_interval_steps,
            regroup_timeout_s=cfg.recovery.regroup_timeout_seconds,
        )
        self.membership = None if settings is None else Membership(settings, world_size=p.world_size)
        self.backend = "nccl" if torch.cuda.is_available() else "gloo"
        if self.membership is not None:
            if self.membership.newcomer:  # warmed before it registers: a registered spare is a ready one
                took = warm_up(self.backend)
                if took is not None:
                    log.info("spare warmed up in %.2f s", took)
            # The default group on the recovery store's round (a spare waits here for its assignment).
            self.membership.join_first(self.backend)
        marks = [("joined", time.monotonic())]
        self.dims = ParallelDims(dp=p.dp, tp=p.tp, pp=p.pp)
        self.mesh = init_distributed(self.dims, backend=self.backend)
        marks.append(("mesh", time.monotonic()))
        self.rank = torch.distributed.get_rank()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(cfg.training.seed)  # the same initial weights on every rank
        model = self._build_model()
        marks.append(("model", time.monotonic()))
        rows_per_rank = cfg.data.rows_per_step // p.dp
        opt = cfg.training
        self.engine = ParallelEngine(
            model,
            self.mesh,
            EngineConfig(
                optimizer=OptimizerConfig(
                    lr=opt.lr,
                    min_lr=opt.min_lr,
                    warmup_steps=opt.warmup_steps,
                    total_steps=max(opt.steps, opt.warmup_steps + 1),
                    weight_decay=opt.weight_decay,
                    betas=opt.betas,
                    grad_clip=opt.grad_clip or 0.0,
                ),
                training_stage=opt.stage,
                micro_batch_rows=cfg.data.micro_batch_rows,
                num_micro_batches=rows_per_rank // cfg.data.micro_batch_rows,
                first_stage_layers=p.first_stage_layers,
                checkpoint_vision=cfg.model.checkpoint_vision,
                checkpoint_text=(
                    True
                    if cfg.model.checkpoint_text_layers == "all"
                    else tuple(cfg.model.checkpoint_text_layers)
                ),
                precision="bf16" if cfg.model.dtype == "bfloat16" else "fp32",
                vision_bag_weight=opt.vision_bag_weight,
                vision_bag_steps=opt.vision_bag_steps,
            ),
        )
        del model
        marks.append(("engine", time.monotonic()))
        self.loader = self._build_loader(model_cfg=self.engine.cfg)
        marks.append(("loader", time.monotonic()))
        ckpt_uri = (
            cfg.checkpoint.dir
            if "://" in cfg.checkpoint.dir or os.path.isabs(cfg.checkpoint.dir)
            else str(self.run_dir / cfg.checkpoint.dir)
        )
        self.checkpointer = Checkpointer(
            CheckpointConfig(
                uri=ckpt_uri,
                interval_steps=cfg.checkpoint.interval_steps,
                keep_last=cfg.checkpoint.keep_last,
                async_save=cfg.checkpoint.async_save,
                storage_outage_seconds=cfg.checkpoint.storage_outage_seconds,
            ),
            layout={"dp": p.dp, "tp": p.tp, "pp": p.pp, "world_size": p.world_size},
        )
        t = cfg.telemetry
        # A host written in the config wins; otherwise the launcher's VLCTL_METRICS_HOST (a pod listens on
        # 0.0.0.0), else the config's default (loopback).
        host = t.host if "host" in t.model_fields_set else os.environ.get(ENV_METRICS_HOST, t.host)
        self.telemetry = RankTelemetry.from_env(
            TelemetryConfig.from_env(
                os.environ,
                enabled=t.enabled,
                host=host,
                tensorboard=t.tensorboard,
                **({"base_port": t.base_port} if t.base_port else {}),
            ),
            run_dir=self.run_dir,
        )
        self.faults = FaultInjector(FaultConfig.from_env(os.environ), rank=self.rank)
        trainable = {1: ("vision", "merger"), 2: ("vision", "merger", "text"), 3: ("merger", "text")}[
            opt.stage
        ]
        self.mfu = MfuMeter(
            self.engine.cfg,
            MfuConfig(peak_flops=t.peak_flops, trainable=trainable),
            model_parallel_size=p.tp * p.pp,
        )
        self.inplace = None if self.membership is None else InPlace(self.membership, self.engine, self.faults)
        marks.append(("rest", time.monotonic()))
        log.info(
            "built in %.3f s after joining (%s)",
            marks[-1][1] - marks[0][1],
            ", ".join(f"{name} {t - marks[i][1]:.3f}" for i, (name, t) in enumerate(marks[1:])),
        )
        self.step = 0
        self.tokens_seen = 0
        return self

    def _build_model(self) -> Qwen2VL:
        name, dtype = self.config.model.name, getattr(torch, self.config.model.dtype)
        if self.config.model.is_preset:
            with torch.device("meta"):  # the engine materialises only this rank's stage
                return Qwen2VL(preset(name))
        return from_pretrained(name, dtype=dtype)

    def _build_loader(self, model_cfg) -> PackedLoader:
        data = self.config.data
        sources = []
        if data.paths:
            dataset = JsonlDataset(
                DatasetConfig(
                    paths=data.paths,
                    tokenizer=data.tokenizer,
                    cache_dir=data.cache_dir,
                    image=ImageProcessorConfig(
                        min_pixels=data.image_min_pixels, max_pixels=data.image_max_pixels
                    ),
                    video=VideoConfig(max_video_tokens=data.max_video_tokens),
                    storage=StorageConfig(storage_options=data.storage_options),
                )
            )
            # One rank builds the cost index (every sample encoded once); the others read it from disk. A
            # newcomer of in-place recovery finds it built, and the survivors are in no barrier.
            newcomer = self.membership is not None and self.membership.newcomer
            if self.rank == 0 and not newcomer:
                dataset.build_index()
            if not newcomer:
                torch.distributed.barrier()
            dataset.build_index()
            sources.append(dataset)
        sources += [CorpusSource(TextCorpus(prefix)) for prefix in data.corpora]
        source = sources[0] if len(sources) == 1 else ConcatSource(sources)
        packing = PackingConfig(
            row_len=data.row_len,
            max_vision_tokens_per_row=data.max_vision_tokens_per_row,
            pad_token_id=model_cfg.fill_token_id,
            image_token_id=model_cfg.image_token_id,
            video_token_id=model_cfg.video_token_id,
        )
        coords = self.mesh.coords
        return PackedLoader(
            source,
            packing=packing,
            config=LoaderConfig(
                seed=data.seed,
                rows_per_step=data.rows_per_step,
                micro_batch_rows=data.micro_batch_rows,
                dp_rank=coords.dp,
                dp_size=self.mesh.dims.dp,
                num_workers=data.num_workers,
                max_bad_fraction=data.max_bad_fraction,
            ),
        )

    # ------------------------------------------------------------------------------------------ checkpoints

    def _checkpoint_tensors(self) -> tuple[dict, dict]:
        """The engine's state as checkpoint tensors: tp shards and ZeRO-1 fragments as pieces of tp- and
        dp-independent global tensors, so a checkpoint reshards on load (live views: loading fills them)."""
        layouts = self.engine.param_layouts()
        model = {}
        for name, tensor in self.engine.model_state_dict().items():
            layout = layouts[name]
            model[name] = tensor if layout.dim is None else LocalChunk(*layout.blocked(tensor))
        optim = {"step": torch.tensor(self.engine.step)}
        state = self.engine.optimizer_state_dict()
        tp = self.mesh.dims.tp
        for name, frag in state["fragments"].items():
            # Fragments index the flattened tp shard: under tp > 1 the names carry the tp rank.
            prefix = f"tp{self.mesh.coords.tp}of{tp}/" if layouts[name].sharded else ""
            for key, view in state["state"][name].items():
                optim[f"{prefix}{name}.{key}"] = LocalChunk(view, (frag.total,), (frag.start,))
        return model, optim

    def resume(self) -> None:
        if self.config.checkpoint.resume == "none":
            return
        model, optim = self._checkpoint_tensors()
        with self.telemetry.time_checkpoint("load", 0):
            restored = self.checkpointer.load(
                model=model, optimizer=optim, step=self.config.checkpoint.resume_step
            )
        if restored is None:
            log.info("no valid checkpoint under %s: starting from scratch", self.checkpointer.config.uri)
            return
        state = self.engine.optimizer_state_dict()
        self.engine.load_optimizer_state_dict({"step": int(optim["step"]), "state": state["state"]})
        self.step, self.tokens_seen = restored.step, restored.tokens_seen
        self.loader.load_state_dict(restored.meta["extra"]["loader"])
        if restored.per_rank is not None:
            restore_rng(restored.per_rank["rng"])
        log.info("resumed from %s (step %d)", restored.uri, restored.step)

    def save(self) -> None:
        """Save the current step (collective). A failure because the storage is unavailable is recorded in the
        checkpointer's outage, not raised."""
        self.checkpointer.settle()
        model, optim = self._checkpoint_tensors()
        with self.telemetry.time_checkpoint("stage", self.step):
            self.checkpointer.attempt(
                self.step,
                model=model,
                optimizer=optim,
                tokens_seen=self.tokens_seen,
                scheduler={"step": self.step},
                config=self.config.model_dump(mode="json"),
                per_rank={"rng": capture_rng()},
                extra={"loader": self.loader.state_dict()},
            )

    # ------------------------------------------------------------------------------------------ the loop

    def train(self) -> int:
        # A spare given a rank starts with a restore; so does every rank after a regroup.
        restore_due = self.membership is not None and self.membership.newcomer
        if not restore_due:
            self.resume()
        steps = self.config.training.steps
        self._batches = iter(self.loader)
        with GracefulStop() as stop:
            self._stop = stop
            while restore_due or self.step < steps:
                try:
                    if restore_due:
                        if not self._restore_in_memory():
                            return EXIT_RECOVERY_FALLBACK
                        restore_due = False
                        continue
                    code = self._step_and_save(steps)
                except Exception as err:
                    if self.inplace is None or not _peer_failure(err):
                        raise
                    # A failure during a recovery (a newcomer lost while restoring, a second rank lost while
                    # the groups re-form) is met the same way: the next round.
                    self._regroup(err)
                    restore_due = True
                    continue
                if code is not None:
                    return code
            return self._finish()

    def _step_and_save(self, steps: int) -> int | None:
        """One step and what follows it at its boundary (saves, outages, a stop); an exit code to end with."""
        ckpt = self.checkpointer
        stop_now = self.train_step(self._batches)
        if self.inplace is not None:
            self.inplace.after_step(self.step, self.engine, self._snapshot_meta())
        finished, retry, expired = self._checkpoint_flags  # agreed by every rank at the sync point
        if finished or expired:
            ckpt.settle()
        if expired and ckpt.outage.active:
            return self._storage_unavailable()
        if stop_now:
            self.save()
            ckpt.settle()
            if ckpt.outage.active:
                log.warning(
                    "step %d was not saved (%s); the job resumes from %s",
                    self.step,
                    STORAGE_UNAVAILABLE,
                    "the start" if ckpt.committed_step is None else f"step {ckpt.committed_step}",
                )
            log.info("stopped on SIGTERM after step %d", self.step)
            return EXIT_PREEMPTED
        if ckpt.outage.active:
            if retry:  # the newest state, in place of the interval saves
                self.save()
        elif ckpt.due(self.step) or self.step == steps:
            self.save()
        return None

    # ------------------------------------------------------------------------------------------ in-place recovery

    def _snapshot_meta(self) -> dict:
        """What a snapshot holds besides the engine's tensors: the rest of the state a resume needs."""
        return {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "loader": self.loader.state_dict(),
            "rng": capture_rng(),
        }

    def _regroup(self, err: BaseException) -> None:
        """A peer is gone: leave the round and join the next one in this process, with new groups under the
        engine and the checkpointer (the restore follows: `_restore_in_memory`). A peer failure while joining
        (the round was superseded by another loss) moves on to the round after it."""
        assert self.inplace is not None
        if self.inplace.membership.coordinator_lost:
            raise RuntimeError(
                f"a collective failed after step {self.step} and the recovery coordinator is gone: no round can "
                "form; ending so the job restarts from its disk checkpoint"
            ) from err
        started = time.monotonic()
        log.warning("a collective failed after step %d (%s: %s); regrouping in place",
                    self.step, type(err).__name__, str(err).splitlines()[0][:200])  # fmt: skip
        self.telemetry.abandon_step()
        while True:
            try:
                self.inplace.regroup(self.backend)
                self.mesh = init_distributed(self.dims, backend=self.backend)
                self.engine.rebind(self.mesh)
                self.checkpointer.regroup()
                break
            except Exception as again:
                if not _peer_failure(again):
                    raise
                self.inplace.membership.next_round_open()  # a probe: is the coordinator's store still there?
                if self.inplace.membership.coordinator_lost:
                    raise RuntimeError(
                        f"round {self.inplace.membership.round} could not form and the recovery coordinator is "
                        "gone; ending so the job restarts from its disk checkpoint"
                    ) from again
                log.warning("round %d failed while forming (%s); joining the next one",
                            self.inplace.membership.round, str(again).splitlines()[0][:200])  # fmt: skip
        log.info(
            "round %d: groups re-formed in %.3f s", self.inplace.membership.round, time.monotonic() - started
        )

    def _restore_in_memory(self) -> bool:
        """Collective over the new round: every rank back to the newest step all of them hold (a newcomer from
        the replica its keeper sends). False when there is none."""
        assert self.inplace is not None
        started = time.monotonic()
        step = self.inplace.restore_point()
        if step is None:
            log.error(
                "in-place recovery: the state of rank(s) %s is in no memory (lost with the peer that kept its "
                "replica); exiting for a restart from the disk checkpoint",
                self.inplace.newcomers,
            )
            return False
        newcomer = self.inplace.membership.newcomer
        meta = self.inplace.restore(self.engine, step, done=None if newcomer else self.step)
        self.step, self.tokens_seen = int(meta["step"]), int(meta["tokens_seen"])
        self.loader.load_state_dict(meta["loader"])
        restore_rng(meta["rng"])
        self._batches = iter(self.loader)
        log.info("in-place recovery: back at step %d from memory in %.3f s", step, time.monotonic() - started)
        return True

    def _finish(self) -> int:
        """After the last step: its save committed, retrying through an outage until the limit."""
        ckpt = self.checkpointer
        ckpt.settle()
        while ckpt.committed_step != self.step:  # the same on every rank: settled outcomes are
            if ckpt.outage.active:
                outage = ckpt.outage
                until = min(outage.next_retry_at, (outage.since or 0.0) + outage.limit_s)
                # No step is taken while it waits: the growing outage it reports tells the controller's hang
                # check that this rank is alive (controller/hangs.py), not stuck.
                while (left := until - time.monotonic()) > 0:
                    time.sleep(min(left, STORAGE_WAIT_REPORT_S))
                    outage_s = outage.seconds(time.monotonic())
                    self.telemetry.log({"checkpoint_storage_outage_seconds": outage_s}, self.step)
                (expired,) = sync_flags(None, (ckpt.outage.expired(time.monotonic()),))
                if expired:
                    return self._storage_unavailable()
            self.save()
            ckpt.settle()
        return 0

    def _storage_unavailable(self) -> int:
        ckpt = self.checkpointer
        outage, last = ckpt.outage, ckpt.outage.last
        self.telemetry.log({"checkpoint_storage_outage_seconds": outage.seconds(time.monotonic())}, self.step)
        # The last line of every rank's log; the controller's StorageUnavailable message quotes it.
        log.error(
            "%s: %s: no checkpoint could be written for %.0f s (checkpoint.storage_outage_seconds = %g), "
            "%d failed saves, the last of step %s: %s; newest committed step: %s; exit code %d",
            STORAGE_UNAVAILABLE,
            ckpt.config.uri,
            outage.seconds(time.monotonic()),
            outage.limit_s,
            outage.failures,
            last.step if last else "?",
            last.error if last else "?",
            "none" if ckpt.committed_step is None else ckpt.committed_step,
            EXIT_STORAGE_UNAVAILABLE,
        )
        return EXIT_STORAGE_UNAVAILABLE

    def train_step(self, batches) -> bool:
        """One optimizer step; True when some rank asked to stop (SIGTERM), decided together at the sync point."""
        tel = self.telemetry
        started = time.perf_counter()
        tel.start_step(self.step)
        self.faults.before_step(self.step)
        with tel.timer.phase("data"):
            micro = [next(batches) for _ in range(self.engine.config.num_micro_batches)]
        self._stop_now = False
        self._checkpoint_flags: tuple[bool, ...] = (False, False, False)
        result = self.engine.train_step(
            [m.inputs for m in micro],
            timer=tel.timer,
            before_optimizer=self._meet,
            on_micro_step=tel.micro_step_done,
        )
        self.step += 1
        self.tokens_seen += result.rank_text_tokens + result.rank_vision_tokens
        counters = {f"data/{k}": v for k, v in self.loader.counters.as_dict().items()}
        # MFU of this data-parallel replica: its micro-batches' FLOPs over the step's wall time.
        flops = sum(self.mfu.flops(self.mfu.shape(m.inputs)) for m in micro)
        times = tel.end_step(
            mfu=self.mfu.mfu(flops, time.perf_counter() - started),
            loss=result.loss,
            text_tokens=result.rank_text_tokens,
            vision_tokens=result.rank_vision_tokens,
            extra={
                "lr": result.lr,
                "grad_norm": result.grad_norm,
                **({} if math.isnan(result.vision_bag_loss) else {"vision_bag_loss": result.vision_bag_loss}),
                "checkpoint_storage_outage_seconds": self.checkpointer.outage.seconds(time.monotonic()),
                **counters,
            },
        )
        self._last_optimizer_s = times.phases["optimizer"]
        return self._stop_now

    def _meet(self) -> None:
        """After the step's compute, before gradient reduction: injected slowness (tests), then the sync point
        (the stop flag and the checkpoint flags, see the module docstring)."""
        timer = self.telemetry.timer
        self.faults.slow_down(self.step, timer, rest_of_step=getattr(self, "_last_optimizer_s", 0.0))
        flags = (self._stop.requested, *self.checkpointer.outage_flags(time.monotonic()))
        if self.inplace is not None:
            with timer.collective(sync=True):  # waiting on the peers' replicas, not this rank's own work
                self.inplace.settle_replicas()
        votes = () if self.inplace is None else (self.inplace.vote(),)
        (stop, *checkpoint), committed = sync_values(timer, flags, votes)
        self._stop_now, self._checkpoint_flags = stop, tuple(checkpoint)
        if self.inplace is not None:
            self.inplace.agreed(committed[0])

    def __exit__(self, *exc: object) -> None:
        for close in ("checkpointer", "loader", "telemetry"):
            if hasattr(self, close):
                try:
                    getattr(self, close).close()
                except Exception:  # noqa: BLE001 - closing must not hide the run's own error
                    log.exception("closing the %s failed", close)
        destroy_distributed()


def _peer_failure(err: BaseException) -> bool:
    """The error, or one it was raised from (a checkpoint save's collective), is a lost peer's."""
    seen: BaseException | None = err
    while seen is not None:
        if is_peer_failure(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False
