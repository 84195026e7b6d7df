"""ComfyUI, a front end: hellomeme's nodes (`nodes`), their inputs made from the settings
(`inputs`), the values they pass between them (`values`), the one door to ComfyUI's own modules
(`comfy`), and the `hellomeme comfyui install` that puts them in a ComfyUI (`install`).

May import: the spine (api, pipeline, settings, versions, front_end) and every room below it; ComfyUI's
modules only through `comfy`; nothing imports it but the command line (and ComfyUI, through the
`custom_nodes/hellomeme` folder `install` writes).
"""
