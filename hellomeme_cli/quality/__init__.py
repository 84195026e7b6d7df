"""Quality: what a made clip is worth, in numbers and in one picture: pose, expression, identity,
temporal stability and sync against its inputs (`evaluate`), side by side for several variants (`compare`).
May import: the base, media/, weights/, face/, settings and versions (and pipeline for `compare`'s runs)."""
