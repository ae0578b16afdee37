"""The harness itself: a stock text-to-image graph, converted from the UI format, runs on the tiny checkpoint."""

from __future__ import annotations

from comfy_harness import SD15_CHECKPOINT, EventRecorder, UIGraph, history_error, ui_to_api, validate_ui_workflow


def txt2img(info: dict) -> dict:
    g = UIGraph(info)
    ck = g.node("CheckpointLoaderSimple", [SD15_CHECKPOINT])
    pos = g.node("CLIPTextEncode", ["a photo of a cat"])
    neg = g.node("CLIPTextEncode", [""])
    lat = g.node("EmptyLatentImage", [64, 64, 1])
    ks = g.node("KSampler", [7, "randomize", 2, 5.0, "euler", "normal", 1.0])
    dec = g.node("VAEDecode")
    save = g.node("SaveImage", ["harness"])
    g.link(ck, 0, ks, "model")
    g.link(ck, 1, pos, "clip")
    g.link(ck, 1, neg, "clip")
    g.link(pos, 0, ks, "positive")
    g.link(neg, 0, ks, "negative")
    g.link(lat, 0, ks, "latent_image")
    g.link(ks, 0, dec, "samples")
    g.link(ck, 2, dec, "vae")
    g.link(dec, 0, save, "images")
    return g.to_json()


def test_ui_to_api_positional_widgets_and_seed_control(comfy_server) -> None:
    info = comfy_server.object_info()
    wf = txt2img(info)
    assert validate_ui_workflow(wf, info) == []
    api = ui_to_api(wf, info)
    ks = api["5"]["inputs"]
    assert ks["seed"] == 7 and ks["steps"] == 2 and ks["cfg"] == 5.0 and ks["sampler_name"] == "euler"
    assert ks["model"] == ["1", 0] and ks["latent_image"] == ["4", 0]
    assert ui_to_api(wf, info, randomize=lambda: 123)["5"]["inputs"]["seed"] == 123


def test_stock_graph_runs_headless(comfy_server) -> None:
    info = comfy_server.object_info()
    wf = txt2img(info)
    with EventRecorder(comfy_server) as rec:
        entry = comfy_server.run(ui_to_api(wf, info), client_id=rec.client_id, workflow=wf, timeout=300)
        assert entry["status"]["status_str"] == "success", history_error(entry)
        rec.wait_for(lambda e, d: e == "executing" and d.get("node") is None)
    images = entry["outputs"]["7"]["images"]
    assert len(images) == 1 and images[0]["filename"].startswith("harness")
    assert rec.of("progress"), "KSampler should report progress over the websocket"
