"""`deepseemoe train`: load the model once, stream the text through it, train every coder of the
run config from the same forward passes, and write the dictionary run (its layout: runs/dictionary.py)
— config.yaml, checkpoint, metrics.jsonl, dictionaries/NAME/ and, when asked, exports/FORMAT/.

Under torchrun every rank loads the model on its own device, reads every world-th batch, and
rank 0 writes the files.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from deepseemoe.dictionaries.activation_cache import ActivationCacheWriter, cache_state, cached_stream
from deepseemoe.dictionaries.coder import Coder, build_coder
from deepseemoe.dictionaries.config import CoderSpec, RunSpec
from deepseemoe.dictionaries.formats import save_circuit_tracer, save_native, save_saelens, save_sparsify
from deepseemoe.dictionaries.stream import model_stream
from deepseemoe.dictionaries.trainer import CoderTrainer
from deepseemoe.distributed import join
from deepseemoe.errors import DeepSeeMoEError, keep
from deepseemoe.models.handle import ModelHandle
from deepseemoe.runs import stamp
from deepseemoe.runs.atomic import atomic_write_bytes
from deepseemoe.runs.dictionary import DictionaryRun


@dataclass
class TrainResult:
    out: Path
    steps: int
    tokens: int
    seconds: float
    final: dict[str, dict]  # coder name -> last metrics
    exhausted: bool  # the corpus ran out before the token budget


def load_for_run(spec: RunSpec, device: str | None, *, trust_remote_code: bool = False) -> ModelHandle:
    """The run's model. Remote code runs only when the caller grants it (the current command line's
    --trust-remote-code); a config that asks for it is refused without the grant, never obeyed."""
    from deepseemoe.models.load import load_model

    if spec.trust_remote_code and not trust_remote_code:
        raise DeepSeeMoEError(f"the run's config asks to run {spec.model}'s own code (trust_remote_code: true), "
                              "which a config never grants; pass --trust-remote-code if you trust that code")
    return load_model(spec.model, dtype=spec.dtype, device=device, device_map=spec.device_map,
                      trust_remote_code=trust_remote_code)


def run_batches(spec: RunSpec, handle: ModelHandle, *, data: str | None = None, batch_size: int | None = None,
                max_tokens: int | None = None):
    """Packed batches of the run's text (or `data`, read with the run's field settings)."""
    from deepseemoe.data.sources import TextSource, iter_documents
    from deepseemoe.data.tokens import pack_documents

    source = TextSource(data or spec.data, field=spec.field, domain_field=spec.domain_field)
    return pack_documents(handle.require_tokenizer(), iter_documents(source), ctx_len=handle.check_ctx_len(spec.ctx_len),
                          batch_size=batch_size or spec.batch_size, max_tokens=max_tokens)


def _batches(spec: RunSpec, handle: ModelHandle, rank: int, world: int):
    for i, batch in enumerate(run_batches(spec, handle)):
        if i % world == rank:
            yield batch


class MetricSinks:
    """metrics.jsonl always; wandb / tensorboard / trackio when asked for and installed. `spec` needs
    `.log` (the logger names) and `.to_dict()` (the settings they record): a RunSpec, or post-train's settings."""

    def __init__(self, spec: RunSpec, out: Path, enabled: bool, path: Path, keep_steps: int = 0):
        """`keep_steps`: the steps a resumed trainer's checkpoint holds (logged as steps 0…keep_steps-1).
        Lines of later steps (logged after that checkpoint by the run that died) are dropped, so every
        (coder, step) stays one line."""
        self.enabled, self.file, self.others = enabled, None, []
        if not enabled:
            return
        kept = []
        if keep_steps and path.exists():
            for line in path.read_text().splitlines():
                try:
                    if json.loads(line)["step"] < keep_steps:
                        kept.append(line + "\n")
                except (ValueError, KeyError, TypeError):
                    continue  # a line cut short by the kill
        atomic_write_bytes(path, "".join(kept).encode())
        self.file = open(path, "a")  # noqa: SIM115 - closed in close()
        for name in spec.log:
            try:
                if name == "wandb":
                    import wandb

                    # WANDB_MODE read now, not when wandb first set itself up in this process
                    run = wandb.init(project="deepseemoe", config=spec.to_dict(), dir=str(out),
                                     mode=os.environ.get("WANDB_MODE") or None)
                    self.others.append(lambda m, run=run: run.log({f"{m['coder']}/{k}": v for k, v in m.items()
                                                                   if k != "coder"}, step=m["step"]))
                elif name == "tensorboard":
                    from torch.utils.tensorboard import SummaryWriter

                    writer = SummaryWriter(str(out / "tensorboard"))
                    self.others.append(lambda m, w=writer: [w.add_scalar(f"{m['coder']}/{k}", v, m["step"])
                                                            for k, v in m.items() if k not in ("coder", "step")])
                elif name == "trackio":
                    import trackio

                    trackio.init(project="deepseemoe", config=spec.to_dict())
                    self.others.append(lambda m: trackio.log({f"{m['coder']}/{k}": v for k, v in m.items()
                                                              if k != "coder"}))
            except ImportError:
                self.close()
                raise DeepSeeMoEError(f"log: {name} is not installed; pip install {name} or drop it from `log`") from None
            except DeepSeeMoEError:
                self.close()
                raise
            except Exception as exc:  # a logger that cannot start (no login, no network, bad settings)
                self.close()
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
                raise DeepSeeMoEError(f"log: {name} could not start ({first}); fix its setup (for wandb: `wandb "
                                      "login` or WANDB_MODE=offline) or drop it from `log`") from None

    def __call__(self, metrics: list[dict]) -> None:
        if not self.enabled:
            return
        for m in metrics:
            self.file.write(json.dumps(m) + "\n")
            for sink in self.others:
                sink(m)
        self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def sparsify_hookpoint(handle: ModelHandle, cs: CoderSpec, cfg) -> str:
    """Where sparsify would hook the coder: transcoders read their block's input and predict its
    output; SAEs read the output of the module the hookpoint names."""
    src, _ = cs.sites()
    names = handle.hook_names(src[0])
    point = names["block"] if cfg.is_transcoder else names["sparsify"]
    if point is None:
        raise DeepSeeMoEError(f"sparsify hooks module outputs, and no module of {handle.name} outputs "
                              f"{src[0].kind} of layer {src[0].layer}")
    return point


def export_plan(spec: RunSpec, configs: dict[str, object], handle: ModelHandle | None = None,
                specs: dict[str, CoderSpec] | None = None) -> dict[str, list[str]]:
    """Which coders each requested format can hold exactly; the rest are named before training.
    Two coders that would land in the same place of a format (one sparsify hookpoint, one layer of a
    circuit-tracer transcoder set) are refused before training: no export overwrites another."""
    from deepseemoe.dictionaries import formats

    plan: dict[str, list[str]] = {}
    skipped: dict[tuple[str, str], list[str]] = {}
    for fmt in spec.formats:
        plan[fmt] = []
        for name, cfg in configs.items():
            try:
                if fmt == "saelens":
                    formats.saelens_architecture(cfg)
                elif fmt == "sparsify":
                    formats.check_sparsify(cfg)
                    if handle is not None:
                        sparsify_hookpoint(handle, specs[name], cfg)
                else:
                    formats.check_circuit_tracer(cfg)
                plan[fmt].append(name)
            except DeepSeeMoEError as e:
                skipped.setdefault((fmt, str(e)), []).append(name)
    for (fmt, why), names in skipped.items():  # one line per format and reason
        print(f"note: {fmt} skips {', '.join(names)}: {why}")
    if handle is not None:
        slots: dict[tuple[str, object], list[str]] = {}
        for name in plan.get("sparsify", []):
            slots.setdefault(("sparsify hookpoint", sparsify_hookpoint(handle, specs[name], configs[name])),
                             []).append(name)
        clash = next(((where, names) for (_, where), names in slots.items() if len(names) > 1), None)
        if clash:
            where, names = clash
            raise DeepSeeMoEError(f"coders {', '.join(names)} would all be written to the sparsify hookpoint "
                                  f"{where!r}, one over the other; drop sparsify from `formats` or train them in "
                                  "separate runs")
        per_layer = [n for n in plan.get("circuit_tracer", []) if specs[n].kind != "clt"]
        layers = [specs[n].layers[0] for n in per_layer]
        if per_layer and (len(set(layers)) < len(layers)
                          or len({specs[n].kind == "skip_transcoder" for n in per_layer}) > 1):
            # a set has one transcoder per layer and one skip_connection flag: an ambiguous one is not
            # written (each coder keeps its own folder in our format and SAELens')
            print(f"note: circuit_tracer writes no transcoder set: {', '.join(per_layer)} give some layer two "
                  "transcoders or mix skip and plain ones")
            plan["circuit_tracer"] = [n for n in plan["circuit_tracer"] if specs[n].kind == "clt"]
    return plan


def _export(spec: RunSpec, handle: ModelHandle, coders: dict[str, Coder], specs: dict[str, CoderSpec],
            out: Path, plan: dict[str, list[str]]) -> None:
    model_name = hub_id(handle)
    for fmt, names in plan.items():
        per_layer = {}
        for name in names:
            coder, cs = coders[name], specs[name]
            src, tgt = cs.sites()
            hin, hout = handle.hook_names(src[0]), handle.hook_names(tgt[0])
            if fmt == "saelens":
                tc = coder.cfg.is_transcoder
                save_saelens(coder, DictionaryRun(out).exports("saelens") / name, hf_hook_name=hin["hf"], hook_name=hin["tl"],
                             hf_hook_name_out=hout["hf"] if tc else "", hook_name_out=hout["tl"] if tc else "",
                             model_name=model_name, context_size=handle.check_ctx_len(spec.ctx_len))
            elif fmt == "sparsify":
                save_sparsify(coder, DictionaryRun(out).exports("sparsify"), sparsify_hookpoint(handle, cs, coder.cfg))
            elif cs.kind == "clt":
                save_circuit_tracer(coder, DictionaryRun(out).exports("circuit_tracer") / name, model_name=model_name)
            else:
                per_layer[cs.layers[0]] = coder
        if per_layer:  # circuit-tracer: a set needs a transcoder for every layer 0..L-1
            if sorted(per_layer) != list(range(len(per_layer))):
                print(f"note: circuit_tracer transcoder set skipped: layers {sorted(per_layer)} are not 0..L-1")
            else:
                save_circuit_tracer(per_layer, DictionaryRun(out).exports("circuit_tracer") / "transcoder_set",
                                    model_name=model_name)


def hub_id(handle: ModelHandle) -> str:
    """The model's hub id when it is known (the name it was loaded by, or the one its config
    records), else "" — never a local path, which means nothing on another machine."""
    for name in (handle.name, getattr(getattr(handle.model, "config", None), "_name_or_path", "")):
        if name and not name.startswith(("tiny:", "/", ".", "~")) and name.count("/") == 1 and not Path(name).exists():
            return name
    return ""


# Settings a resumed run may change: how long, where, what is logged or exported; everything else
# defines the run (its data, its coders, its optimisation) and must match the saved config.
RESUMABLE_CHANGES = {"tokens", "out", "model_device", "coder_device", "device_map", "checkpoint_every", "formats", "log",
                     "activation_cache", "train.device", "train.autocast"}


def resume_conflicts(saved: dict, new: dict, prefix: str = "") -> list[str]:
    """The settings (dotted names, coders[i].key) that differ between a saved config and a new one."""
    differ = []
    for key in sorted(set(saved) | set(new)):
        name = f"{prefix}{key}"
        if name in RESUMABLE_CHANGES:
            continue
        a, b = saved.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            differ += resume_conflicts(a, b, f"{name}.")
        elif key == "coders" and isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
            for i, (ca, cb) in enumerate(zip(a, b, strict=True)):
                differ += resume_conflicts(ca, cb, f"coders[{i}].")
        elif a != b:
            differ.append(name)
    return differ


def train_run(spec: RunSpec, *, resume: bool = False, progress: bool = True,
              trust_remote_code: bool = False) -> TrainResult:
    import time

    place = join()
    rank, world, local_rank = place.rank, place.size, place.local_rank
    cuda = torch.cuda.is_available()
    model_device = spec.model_device or (f"cuda:{local_rank}" if cuda else "cpu")
    coder_device = spec.coder_device or model_device
    spec.train.device = coder_device
    out = Path(spec.out)
    run = DictionaryRun(out)
    ckpt = run.checkpoint()
    if (out / "checkpoint.pt").exists():  # written by DeepSeeMoE ≤ 0.1 as a pickle: never unpickled
        raise DeepSeeMoEError(f"{out / 'checkpoint.pt'} is a pickled checkpoint of an older version, which is never "
                              "loaded (unpickling can run code); delete it and train again, or choose another --out")
    if out.exists() and not out.is_dir():
        raise DeepSeeMoEError(f"--out {out} is a file; give a folder for the run")
    if resume and not ckpt.exists():
        raise DeepSeeMoEError(f"nothing to resume: {ckpt} does not exist; run without --resume")
    if resume:
        differ = resume_conflicts(RunSpec.from_run_dir(out).to_dict(), spec.to_dict())
        if differ:
            raise DeepSeeMoEError(f"--resume continues the run in {out} as it was configured, but "
                                  f"{', '.join(differ)} differ from its config.yaml; resume with the same settings "
                                  "or train into another --out")
    if not resume and ckpt.exists():
        raise DeepSeeMoEError(f"{out} already holds a training run; pass --resume to continue it or choose "
                              "another --out")
    from deepseemoe.data.sources import resolve_files

    if not spec.data.startswith("hf:"):
        resolve_files(spec.data)  # fail on a bad path before loading the model

    handle = load_for_run(spec, model_device, trust_remote_code=trust_remote_code)
    block_layers = sorted(set(handle.moe_layers) | set(handle.dense_mlps))
    specs: dict[str, CoderSpec] = {}
    coders: dict[str, Coder] = {}
    pairs = {}
    split = spec.distribute == "coders" and world > 1
    if split and world > len(spec.coders):
        raise DeepSeeMoEError(f"distribute: coders needs at least one coder per rank ({len(spec.coders)} coders, "
                              f"{world} ranks); use fewer processes or distribute: data")
    for i, cs in enumerate(spec.coders):
        cs.resolve_layers(handle.num_layers, block_layers, sorted(handle.moe_layers))
        if split and i % world != rank:  # coders split across ranks: this rank trains every world-th
            specs[cs.name] = cs
            continue
        src, tgt = cs.sites()
        torch.manual_seed(spec.train.seed)
        coders[cs.name] = build_coder(cs.coder_config(handle.site_width(src[0]), handle.site_width(tgt[0])),
                                      device=coder_device)
        specs[cs.name], pairs[cs.name] = cs, (src, tgt)
    plan = export_plan(spec, {n: c.cfg for n, c in coders.items()}, handle, specs) if rank == 0 and not split else {}

    trainer = CoderTrainer(coders, spec.train, data_parallel=not split,
                           sparsity_coefs={n: specs[n].sparsity_coef for n in coders})
    if resume:
        trainer.resume(ckpt)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        sinks = MetricSinks(spec, out, enabled=rank == 0 or split, path=run.metrics(rank), keep_steps=trainer.step)
    except BaseException:
        if created:  # nothing of this run was written: leave no folder behind
            import shutil

            shutil.rmtree(out, ignore_errors=True)
        raise
    if rank == 0:
        run.save_config(spec.to_dict())
    if not resume:
        keep("train", f"nothing of the run in {out} was kept (no checkpoint yet): the same command starts it again")
    start = time.perf_counter()
    writer = None
    try:
        if spec.activation_cache and world > 1 and not split:
            raise DeepSeeMoEError("activation_cache works with one process; drop it or run without torchrun")
        state = cache_state(spec.activation_cache, spec.cache_key()) if spec.activation_cache else "missing"
        if state == "complete":
            stream = cached_stream(spec.activation_cache, pairs, device=coder_device)
        else:
            if spec.activation_cache:
                sites = sorted({s for g in pairs.values() for grp in g for s in grp}, key=lambda s: (s.layer, s.kind))
                writer = ActivationCacheWriter(spec.activation_cache, spec.cache_key(), sites)
            shard = (0, 1) if split else (rank, world)  # split: every rank reads every batch
            stream = model_stream(handle, _batches(spec, handle, *shard), pairs, device=coder_device,
                                  on_capture=writer.add if writer else None)
        trainer.fit(stream, max_steps=spec.max_steps, checkpoint=ckpt, checkpoint_every=spec.checkpoint_every,
                    progress=progress and rank == 0, on_step=sinks)
        if writer is not None:
            writer.close()
    except BaseException:
        sinks.close()
        if not resume and not ckpt.exists():  # failed before its first checkpoint: nothing half-written stays
            run.discard_unstarted(created)
        raise
    finally:
        sinks.close()
    seconds = time.perf_counter() - start
    trainer.save(ckpt)
    final = {}
    for m in trainer.metrics:
        final[m["coder"]] = m
    # the weights' identity, so that a later reader (a post-training hint) knows the model even after
    # its folder moved; a hub id is its own identity
    model_weights = stamp.model_digest(Path(spec.model)) if (Path(spec.model) / "config.json").is_file() else None
    if rank == 0 or split:
        for name, coder in coders.items():
            cs = specs[name]
            src, tgt = cs.sites()
            meta = {"model": handle.name, "model_weights": model_weights, "kind": cs.kind, "layers": cs.layers,
                    "source": [[s.kind, s.layer] for s in src], "target": [[s.kind, s.layer] for s in tgt],
                    "hooks_in": [handle.hook_names(s) for s in src], "hooks_out": [handle.hook_names(s) for s in tgt],
                    "tokens": trainer.tokens, "steps": trainer.step, "final": final.get(name, {}),
                    "train": spec.train.to_dict()}
            if coder.cfg.ternary:  # what was trained: the ternary weights (the float ones were its optimizer's)
                coder.bake_ternary_()
            save_native(coder.eval(), run.coder_dir(name), meta=meta)
    if split:  # rank 0 exports every coder, read back from the files the ranks wrote
        import torch.distributed as dist

        dist.barrier()
        if rank == 0 and spec.formats:
            from deepseemoe.dictionaries.formats import load_native

            every = {name: load_native(run.coder_dir(name), device=coder_device)[0] for name in specs}
            _export(spec, handle, every, specs, out, export_plan(spec, {n: c.cfg for n, c in every.items()}, handle,
                                                                 specs))
    elif rank == 0:
        _export(spec, handle, coders, specs, out, plan)
    place.close()
    return TrainResult(out=out, steps=trainer.step, tokens=trainer.tokens, seconds=seconds, final=final,
                       exhausted=trainer.step < spec.max_steps)
