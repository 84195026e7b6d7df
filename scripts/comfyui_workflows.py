"""Write the ComfyUI example workflows (hellomeme_cli/comfyui/example_workflows/): each graph below as
its API-format twin (`*_api.json`, every widget of hellomeme's nodes at its default, as /object_info
gives them), then that twin opened in ComfyUI's page, laid out in columns and saved as the page
saves a workflow (what the Templates menu opens). Needs a ComfyUI with the pack installed
(`hellomeme comfyui install`), running, and Debian's chromium; run it again when a setting changes
(tests/test_comfyui.py says when).

    .venv/bin/python scripts/comfyui_workflows.py --url http://127.0.0.1:8188
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from playwright.sync_api import sync_playwright

FOLDER = Path(__file__).resolve().parents[1] / "hellomeme_cli" / "comfyui" / "example_workflows"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run"]
WIDGETS = ("INT", "FLOAT", "BOOLEAN", "STRING")


def core(kind: str, title: str, **inputs) -> dict:
    return {"class_type": kind, "inputs": inputs, "_meta": {"title": title}}


def ours(kind: str, **inputs) -> dict:
    return {"class_type": kind, "inputs": inputs}  # the widgets' defaults are filled from /object_info


# Each workflow: its nodes (id: node), the columns they are laid out in, the page's zoom.
WORKFLOWS = {
    "hellomeme_video": (
        {
            "1": core("LoadImage", "Load Image (reference portrait)", image="chillout.jpg"),
            "2": core("LoadVideo", "Load Video (driving clip)", file="jue.mp4"),
            "3": ours("HelloMemeLoadPipeline"),
            "4": ours("HelloMemeDrivingMotion", video=["2", 0]),
            "5": ours("HelloMemeAnimate", pipeline=["3", 0], reference=["1", 0], driving=["4", 0], seed=1),
            "6": core("SaveVideo", "Save Video", video=["5", 0], filename_prefix="hellomeme/video", format="auto", codec="auto"),
            "7": core("PreviewImage", "Preview Image (what is followed)", images=["4", 1]),
        },
        [["1", "2"], ["3", "4"], ["5"], ["6", "7"]],
        0.8,
    ),
    "hellomeme_image": (
        {
            "1": core("LoadImage", "Load Image (reference portrait)", image="chillout.jpg"),
            "2": core("LoadImage", "Load Image (driving picture)", image="majicmix1.jpg"),
            "3": ours("HelloMemeLoadPipeline", mode="image", version="v5"),
            "4": ours("HelloMemeImage", pipeline=["3", 0], reference=["1", 0], driving=["2", 0], seed=1),
            "5": core("SaveImage", "Save Image", images=["4", 0], filename_prefix="hellomeme/image"),
        },
        [["1", "2"], ["3"], ["4"], ["5"]],
        0.9,
    ),
    "hellomeme_compare_versions": (
        {
            "1": core("LoadImage", "Load Image (reference portrait)", image="chillout.jpg"),
            "2": core("LoadVideo", "Load Video (driving clip)", file="jue.mp4"),
            "3": ours("HelloMemeDrivingMotion", video=["2", 0]),
            "4": ours("HelloMemeLoadPipeline", version="v2"),
            "5": ours("HelloMemeLoadPipeline", version="v5"),
            "6": ours("HelloMemeAnimate", pipeline=["4", 0], reference=["1", 0], driving=["3", 0], seed=1),
            "7": ours("HelloMemeAnimate", pipeline=["5", 0], reference=["1", 0], driving=["3", 0], seed=1),
            "8": core("ImageStitch", "Image Stitch (v2 | v5)", image1=["6", 1], image2=["7", 1], direction="right", match_image_size=True, spacing_width=0, spacing_color="white"),
            "9": core("CreateVideo", "Create Video (side by side, with the sound)", images=["8", 0], fps=["6", 2], audio=["6", 3]),
            "10": core("SaveVideo", "Save Video", video=["9", 0], filename_prefix="hellomeme/compare", format="auto", codec="auto"),
            "11": ours("HelloMemeEvaluate", driving=["3", 0], reference=["1", 0], video=["6", 0]),
            "12": ours("HelloMemeEvaluate", driving=["3", 0], reference=["1", 0], video=["7", 0]),
            "13": core("PreviewAny", "Preview Any (v2's eval table)", source=["11", 0]),
            "14": core("PreviewAny", "Preview Any (v5's eval table)", source=["12", 0]),
            "15": core("PreviewImage", "Preview Image (v2's eval plot)", images=["11", 1]),
            "16": core("PreviewImage", "Preview Image (v5's eval plot)", images=["12", 1]),
        },
        [["1", "2"], ["3", "4", "5"], ["6", "7"], ["8", "9", "10"], ["11", "13", "15"], ["12", "14", "16"]],
        0.6,
    ),
}

# In the page: the API twin loaded, its nodes placed column by column, the graph as the page saves it.
LAYOUT = """([prompt, name, columns, zoom]) => {
  app.loadApiJson(prompt, name);
  // Nodes that show a picture, a clip or text need room their computed size does not leave.
  const room = {LoadImage: [320, 420], LoadVideo: [320, 440], SaveVideo: [420, 480], PreviewImage: [420, 380], SaveImage: [420, 420], PreviewAny: [420, 260]};
  let x = 20;
  for (const column of columns) {
    let y = 20, width = 0;
    for (const id of column) {
      const node = app.graph.getNodeById(id);
      const [w, h] = room[node.type] ?? node.computeSize();
      node.size = [Math.max(w, 340), Math.max(h, node.computeSize()[1])];
      node.pos = [x, y];
      y += node.size[1] + 60;
      width = Math.max(width, node.size[0]);
    }
    x += width + 50;
  }
  app.canvas.ds.offset = [10, 75];  // below the page's tab bar
  app.canvas.ds.scale = zoom;
  return JSON.stringify(app.graph.serialize());  // through JSON: fields left undefined are dropped, not made null
}"""


def api_twin(nodes: dict, object_info: dict) -> dict:
    """The nodes with every widget of hellomeme's nodes given: its value here, else its default."""
    prompt = {}
    for node_id, node in nodes.items():
        node = json.loads(json.dumps(node))
        if node["class_type"].startswith("HelloMeme"):
            declared = object_info[node["class_type"]]
            inputs = {**declared["input"]["required"], **declared["input"].get("optional", {})}
            defaults = {name: options.get("default", kind[0] if isinstance(kind, list) else None) for name, (kind, options) in inputs.items()
                        if isinstance(kind, list) or kind in WIDGETS}
            node["inputs"] = {**defaults, **node["inputs"]}
            node["_meta"] = {"title": declared["display_name"]}
        prompt[node_id] = node
    return prompt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8188", help="a running ComfyUI with the pack installed")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    args = parser.parse_args()
    with sync_playwright() as playwright:
        object_info = playwright.request.new_context(base_url=args.url).get("/object_info").json()
        browser = playwright.chromium.launch(executable_path=args.chromium, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        page.goto(args.url)
        page.wait_for_function("!!(window.app && window.LiteGraph && LiteGraph.registered_node_types['HelloMemeAnimate'])", timeout=120_000)
        for name, (nodes, columns, zoom) in WORKFLOWS.items():
            prompt = api_twin(nodes, object_info)
            (FOLDER / f"{name}_api.json").write_text(json.dumps(prompt, indent=2) + "\n")
            workflow = json.loads(page.evaluate(LAYOUT, [prompt, name, columns, zoom]))
            (FOLDER / f"{name}.json").write_text(json.dumps(workflow, indent=1) + "\n")
            print(f"wrote {FOLDER / name}.json and {name}_api.json")
        browser.close()


if __name__ == "__main__":
    main()
