"""Your own Hydra app on top of disttrain's config: `python app.py experiment=sums` (Hydra's own command
line, `-m` sweeps included). The same job as `disttrain --config-dir conf experiment=sums`."""

import hydra
from omegaconf import DictConfig

import disttrain


@hydra.main(version_base="1.3", config_path="conf", config_name="app")
def main(cfg: DictConfig) -> int:
    return disttrain.run(cfg)  # validates, then trains or launches as `launcher=` says


if __name__ == "__main__":
    main()
