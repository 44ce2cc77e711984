"""The mapping rules of sd-scripts' SD3 and FLUX.1 scripts (``sd3_train_network.py``,
``flux_train_network.py``): the model family, the noise-level sampling, guidance and T5 options.

kohya's noise levels (``library/flux_train_utils.get_noisy_model_input_and_timesteps``) map onto
``train.flow``: ``sigmoid`` is a logit-normal density with std ``sigmoid_scale`` and no shift,
``uniform`` the uniform one, ``shift`` the logit-normal shifted by ``discrete_flow_shift``,
``flux_shift`` the logit-normal with FLUX's resolution-dependent shift (``shift=null``), and ``sigma``
(its default) the ``weighting_scheme`` density over the scheduler's timesteps, shifted by
``discrete_flow_shift``.
"""

from __future__ import annotations

from sweeper.kohya_import.convert import Unfit, as_float, as_int, as_str
from sweeper.kohya_import.mapper import Mapper, rule, simple
from sweeper.kohya_import.result import Option

for _key, _target, _convert in (
    ("guidance_scale", "train.guidance", as_float),
    ("t5xxl_max_token_length", "model.t5_max_length", as_int),
    ("logit_mean", "train.flow.logit_mean", as_float),
    ("logit_std", "train.flow.logit_std", as_float),
    ("mode_scale", "train.flow.mode_scale", as_float),
):
    simple(_key, _target, _convert)

# kohya's weighting_scheme names -> train.flow.weighting_scheme (uniform is diffusers' none)
WEIGHTING = {"uniform": "none", "none": "none", "logit_normal": "logit_normal", "mode": "mode"}
WEIGHTING |= {"sigma_sqrt": "sigma_sqrt", "cosmap": "cosmap"}
KOHYA_FLOW_SHIFT = 3.0  # sd-scripts' discrete_flow_shift default


@rule("timestep_sampling", "discrete_flow_shift", "sigmoid_scale", "weighting_scheme")
def _noise_levels(m: Mapper, taken: dict[str, Option]) -> None:
    sampling = as_str(taken["timestep_sampling"].value).lower() if "timestep_sampling" in taken else "sigma"
    shift = as_float(taken["discrete_flow_shift"].value) if "discrete_flow_shift" in taken else KOHYA_FLOW_SHIFT
    scale = as_float(taken["sigmoid_scale"].value) if "sigmoid_scale" in taken else 1.0
    scheme = as_str(taken["weighting_scheme"].value).lower() if "weighting_scheme" in taken else "uniform"
    first = next(iter(taken.values()))
    if scheme not in WEIGHTING:
        raise Unfit(f"weighting_scheme {scheme!r} is not one of {', '.join(WEIGHTING)}")
    if sampling in ("sigmoid", "shift", "flux_shift"):
        m.set("train.flow.weighting_scheme", "logit_normal", first, f"timestep_sampling={sampling}: sigmoid(N(0, s))")
        m.set("train.flow.logit_std", scale, first, "sigmoid_scale")
        shifts = {"sigmoid": 1.0, "shift": shift, "flux_shift": None}
        m.set(
            "train.flow.shift", shifts[sampling], first, "flux_shift: by image size" if sampling == "flux_shift" else ""
        )
    elif sampling == "uniform":
        m.set("train.flow.weighting_scheme", "none", first, "timestep_sampling=uniform: σ ~ U(0, 1)")
        m.set("train.flow.shift", 1.0, first, "no shift")
    elif sampling == "sigma":
        m.set("train.flow.weighting_scheme", WEIGHTING[scheme], first, "timestep_sampling=sigma (kohya's default)")
        m.set("train.flow.shift", shift, first, "discrete_flow_shift (kohya's default 3.0)")
    else:
        raise Unfit(f"timestep_sampling {sampling!r} is not one of sigma, uniform, sigmoid, shift, flux_shift")
    for option in list(taken.values())[1:]:
        m.nothing(option, "read with timestep_sampling (train.flow)")


@rule("model_prediction_type")
def _prediction(m: Mapper, taken: dict[str, Option]) -> None:
    option = taken["model_prediction_type"]
    if as_str(option.value).lower() == "raw":
        m.nothing(option, "raw: the velocity loss trained here")
    else:
        m.unmapped(
            option,
            f"{option.value}: the loss here is the raw velocity's (model_prediction_type=raw); "
            "sigma_scaled (kohya's default) weights it by σ², which train.flow does not offer",
        )


@rule("model_type")
def _model_type(m: Mapper, taken: dict[str, Option]) -> None:
    option = taken["model_type"]
    if as_str(option.value).lower() != "flux":
        raise Unfit(f"model_type {option.value!r}: FLUX.1 (flux) is trained here, not Chroma")
    m.set("model.kind", "flux", option, "flux_train_network.py")
