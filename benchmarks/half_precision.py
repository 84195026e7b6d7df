"""How far the video samplers in half precision end from float32 (issue 22, item 4), and which
networks' precision it comes from, on the conformance cases' tiny random weights.

    PYTHONPATH=. .venv/bin/python benchmarks/half_precision.py table --versions v5,v5b --frames 24 --guidance 2.5,3.0
    PYTHONPATH=. .venv/bin/python benchmarks/half_precision.py parts --versions v5 --guidance 3.0 \
        --parts control,motion,reference_attention,groupnorm,layernorm,attention,resnets,transformers

`table`: relative error ||half - float32|| / ||float32|| of the final latents, networks in bfloat16
and float16 (latents and scheduler float32, as `--dtype` runs), random inputs of the given length.
Our float32 samplers reproduce the official float32 latents to 1e-5 or better, so our float32 run
stands in for the official one on inputs the cases do not hold.

`parts`: one guided motion-denoiser call on a 12-frame window at the first step (v1, v2, v5, v5b),
the error of the unconditional half, the conditional half and the guided noise when (`keep32`) every
network is in bfloat16 but the part, kept in float32 (its inputs cast in, its output cast back), or
(`only_half`) every network is in float32 but the part. `weights` in only_half: float32 compute on
bfloat16-rounded weights. `--full`: the whole sampler instead of one call (slow on a CPU).

Needs the conformance data (`../shared/conformance`, or $HELLOMEME_CONFORMANCE_DIR).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
import warnings
from pathlib import Path

import diffusers
import torch
from diffusers.models.attention_processor import Attention
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the conformance cases' loader
from conformance_case import load_case, networks_to, random_sampler_inputs, relative_error, sampler_case  # noqa: E402
from conftest import CONFORMANCE_DIR  # noqa: E402

from hellomeme_cli.samplers.common import SamplerInputs, SamplerSettings, draw_noise, fresh_schedule  # noqa: E402

diffusers.utils.logging.set_verbosity_error()
warnings.filterwarnings("ignore")
CASES = {"v1": "sampler_public", "v2": "v2/sampler_public", "v3": "v3/sampler_public", "v4": "v4/sampler_public",
         "v5": "v5/sampler_public", "v5b": "v5b/sampler_public"}


def build(version: str):
    """(float32 sampler, case, io, the control inputs it takes, the case's settings)."""
    folder = CONFORMANCE_DIR / CASES[version]
    if version in ("v1", "v2"):
        sampler, _, settings, case, io = sampler_case(folder, torch.float32)
        return sampler, case, io, sampler.control.inputs, settings
    if version in ("v3", "v4"):
        from test_conformance_v3_sampler import build_sampler

        sampler, _, settings, case, io = build_sampler(folder)
        return sampler, case, io, ("drive_coeff", "face_parts") if case["control"] == "arkit" else ("pd_fpg",), settings
    from test_conformance_v5_sampler import CONTROL_KINDS, _case_sampler

    case, io = load_case(folder)
    settings = SamplerSettings(steps=case["steps"], guidance=case["guidance_scale"])
    return _case_sampler(folder, case), case, io, CONTROL_KINDS[case["control"]].inputs, settings


def random_inputs(io: dict, names, frames: int, seed: int = 7) -> SamplerInputs:
    """Random inputs at the case's size, with its unconditional PD-FGC input where it has one."""
    h, w = io["in.ref_image"].shape[-2:]
    return random_sampler_inputs(io, names, h, w, frames, seed, neg_pd_fpg=io.get("in.neg_pd_fpg"))


def _cast(value, dtype):
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, dict):
        return {k: _cast(v, dtype) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_cast(v, dtype) for v in value)
    return value


def run_in(module: nn.Module, inner: torch.dtype, outer: torch.dtype, cast_in: bool = True) -> None:
    """`module` computes in `inner`; its inputs arrive in, and its outputs leave as, `outer`."""
    module.to(inner)
    if cast_in:
        module.register_forward_pre_hook(lambda m, a, k: (_cast(a, inner), _cast(k, inner)), with_kwargs=True)
    module.register_forward_hook(lambda m, a, k, out: _cast(out, outer), with_kwargs=True)


def parts_of(sampler, part: str) -> list[nn.Module]:
    """The modules of a named part: control, control_net, control_proj, motion, reference_attention,
    groupnorm, layernorm, attention, resnets, transformers, time_embedding, or path:<attr.path>."""
    denoiser = sampler.denoiser_motion
    roots = [m for m in vars(sampler).values() if isinstance(m, nn.Module)] + [denoiser]
    unique = lambda mods: list({id(m): m for m in mods}.values())  # noqa: E731
    of_type = lambda *kinds: unique(m for r in roots for m in r.modules() if type(m).__name__ in kinds)  # noqa: E731
    if part.startswith("path:"):
        obj = sampler
        for name in part[5:].split("."):
            obj = obj[int(name)] if name.isdigit() else getattr(obj, name)
        return list(obj) if isinstance(obj, nn.ModuleList) else [obj]
    if part == "control":
        return [sampler.control_net] + ([sampler.control_proj] if getattr(sampler, "control_proj", None) is not None else [])
    if part in ("control_net", "control_proj"):
        return [getattr(sampler, part)]
    if part == "motion":
        adapter = getattr(denoiser, "motion_adapter", None)
        if adapter is not None and hasattr(adapter, "motion_down"):  # v5
            return list(adapter.motion_down) + list(adapter.motion_up)
        unet = denoiser.unet
        return [m for block in [*unet.down_blocks, unet.mid_block, *unet.up_blocks] for m in (getattr(block, "motion_modules", None) or [])]
    if part == "reference_attention":
        return [m for child in denoiser.reference_adapter.children() if isinstance(child, nn.ModuleList) for m in child]
    if part == "attention":
        return unique(m for r in roots for m in r.modules() if isinstance(m, Attention))
    if part == "time_embedding":
        return unique([denoiser.unet.time_embedding, sampler.denoiser_2d.unet.time_embedding])
    kinds = {"groupnorm": ("GroupNorm",), "layernorm": ("LayerNorm",), "resnets": ("ResnetBlock2D",), "transformers": ("Transformer2DModel",)}
    return of_type(*kinds[part])


def mixed(version: str, base: torch.dtype, part: str, other: torch.dtype):
    """The version's sampler, networks in `base`, the `+`-joined parts in `other` (`none`: none)."""
    sampler = build(version)[0]
    networks_to(sampler, base)
    if part == "none":
        return sampler
    if part == "weights":  # float32 compute on weights rounded through `other`
        networks_to(sampler, torch.float32)
        with torch.no_grad():
            for p in {id(p): p for m in [*vars(sampler).values(), sampler.denoiser_motion] if isinstance(m, nn.Module) for p in m.parameters()}.values():
                p.copy_(p.to(other).float())
        return sampler
    for module in (m for name in part.split("+") for m in parts_of(sampler, name)):
        # the control nets take float32 drive inputs and cast them themselves (the 500x coefficients are embedded in float32)
        run_in(module, other, base, cast_in=module is not sampler.control_net)
    return sampler


@torch.no_grad()
def one_call(sampler, inputs: SamplerInputs, settings: SamplerSettings, version: str) -> torch.Tensor:
    """(unconditional, conditional) noise of one motion-denoiser call on the first 12 frames, first step."""
    generator = torch.Generator().manual_seed(11)
    clip = sampler._prepare(inputs, settings, generator, None)
    schedule = fresh_schedule(sampler.scheduler, settings.steps, sampler.device)
    latents = draw_noise(generator, (1, 4, 12, *clip.ref_latents.shape[-2:]), sampler.device) * schedule.init_noise_sigma
    if version in ("v5", "v5b"):
        control, motion = sampler._control(clip, list(range(12))), {"motion_pad": None, "use_motion": True}
    else:
        control, motion = sampler._control(clip, range(12)), {}
    return sampler._predict(sampler.denoiser_motion, latents, schedule, schedule.timesteps[0], clip, control, **motion)


def table(args) -> None:
    for version in args.versions:
        _, case, io, names, base = build(version)
        for frames in args.frames:
            inputs = random_inputs(io, names, frames)
            for guidance in args.guidance:
                settings = dataclasses.replace(base, guidance=guidance)
                reference = build(version)[0].sample(inputs, settings, torch.Generator().manual_seed(11))
                row = [f"{version:4s} {frames} frames, guidance {guidance}, {settings.steps} steps"]
                for dtype in (torch.bfloat16, torch.float16):
                    started = time.time()
                    half = mixed(version, dtype, args.keep32, torch.float32) if args.keep32 else mixed(version, dtype, "none", dtype)
                    out = half.sample(inputs, settings, torch.Generator().manual_seed(11))
                    row.append(f"{str(dtype)[6:]} {relative_error(out, reference):.2e} ({time.time() - started:.0f} s)")
                print(" | ".join(row), flush=True)


def parts(args) -> None:
    for version in args.versions:
        _, case, io, names, base = build(version)
        frames = args.frames[0]
        inputs = random_inputs(io, names, frames if args.full else 12)
        for guidance in args.guidance:
            settings = dataclasses.replace(base, guidance=guidance)
            run = (lambda s: s.sample(inputs, settings, torch.Generator().manual_seed(11))) if args.full else (lambda s: one_call(s, inputs, settings, version))
            reference = run(build(version)[0])
            for part in args.parts:
                sampler = mixed(version, torch.bfloat16, part, torch.float32) if args.mode == "keep32" else mixed(version, torch.float32, part, torch.bfloat16)
                out = run(sampler)
                if args.full:
                    print(f"{version} {frames} frames g={guidance} {args.mode} {part:24s} latents {relative_error(out, reference):.2e}", flush=True)
                    continue
                (ru, rc), (ou, oc) = reference.chunk(2), out.chunk(2)
                guided = relative_error(ou + guidance * (oc - ou), ru + guidance * (rc - ru))
                print(f"{version} g={guidance} {args.mode} {part:24s} uncond {relative_error(ou, ru):.2e} cond {relative_error(oc, rc):.2e} guided {guided:.2e}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=("table", "parts"))
    parser.add_argument("--versions", type=lambda s: s.split(","), default=list(CASES))
    parser.add_argument("--frames", type=lambda s: [int(x) for x in s.split(",")], default=[24])
    parser.add_argument("--guidance", type=lambda s: [float(x) for x in s.split(",")], default=[2.5, 3.0])
    parser.add_argument("--parts", type=lambda s: s.split(","), default=["none", "control", "motion", "reference_attention"])
    parser.add_argument("--mode", choices=("keep32", "only_half"), default="keep32")
    parser.add_argument("--keep32", default="", help="table: keep these parts in float32")
    parser.add_argument("--full", action="store_true", help="parts: the whole sampler, not one call")
    args = parser.parse_args()
    torch.set_num_threads(2)
    (table if args.what == "table" else parts)(args)


if __name__ == "__main__":
    main()
