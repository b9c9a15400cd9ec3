import dataclasses
from pathlib import Path

from monoscope.layout import Layout


def test_every_place_lies_under_the_root_and_moves_with_it():
    layout = Layout(Path("/data/run 1/results"))
    places = [getattr(layout, f.name) for f in dataclasses.fields(Layout)]
    places += [layout.token_shard("train_000"), layout.activation_store("eval_001"), layout.sae_train_log("x8_l1-3.75"),
               layout.log("evaluate/neurons"), layout.benchmark("harvest/000")]
    for group in (layout.sae_checkpoint("x8"), layout.eval_outputs("x8"), layout.features_outputs("neurons"),
                  layout.autointerp_outputs("x8"), layout.autointerp_comparison):
        places += group.values()
    assert all(place.is_relative_to(layout.root) for place in places)
    assert len(set(places)) == len(places)  # no two outputs share a path
    relative = Layout("results")
    assert relative.sae_checkpoint("{name}")["weights"] == Path("results/sae/{name}/sae.safetensors")  # a rule's pattern
    assert not relative.autointerp_comparison["key"].is_relative_to(relative.autointerp_comparison["sheet"].parent)
