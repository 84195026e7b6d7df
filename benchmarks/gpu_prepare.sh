#!/usr/bin/env bash
# Run here, before benchmarks/gpu_check.sh on a borrowed GPU machine: puts into .gpu/ (git-ignored,
# `carry` it with the run, about 55 MB) what such a machine lacks: the wheels of diffusers and
# mediapipe (CPython 3.12, x86-64; its image holds torch, transformers, peft and the rest), the
# official checkout's package, the face model, a portrait and a driving template tracked here.
#
#   benchmarks/gpu_prepare.sh /path/to/HelloMeme          # a checkout of github HelloVision/HelloMeme
set -euo pipefail
official=${1:?usage: benchmarks/gpu_prepare.sh OFFICIAL_CHECKOUT}
python=${PYTHON:-.venv/bin/python}
shared=${HELLOMEME_SHARED_DIR:-../shared}
[ -d "$official/hellomeme" ] || { echo "$official: no hellomeme/ package in it (a checkout of github HelloVision/HelloMeme?)" >&2; exit 1; }

rm -rf .gpu
mkdir -p .gpu/whl .gpu/official
"$python" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .gpu/whl diffusers==0.42.1 mediapipe==1.2.2 sounddevice==0.5.2
cp -r "$official/hellomeme" .gpu/official/
cp "$shared/models/face_landmarker.task" "$shared/media/majicmix1.jpg" .gpu/
home=$(mktemp -d)  # tracking needs only the face model
HELLOMEME_HOME=$home "$python" -m hellomeme_cli weights import .gpu/face_landmarker.task >/dev/null
HELLOMEME_HOME=$home "$python" -m hellomeme_cli track "$shared/media/qie.mp4" -o .gpu/qie.npz
rm -rf "$home"
du -sh .gpu
