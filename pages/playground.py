"""KD playground (teaching): what a trained teacher's soft targets look like, and what the temperature does.

Pick a finished run (its teacher and its students) and a test image; move the temperature T and watch
(1) the teacher's softmax spread out next to the one-hot label ("dark knowledge"), (2) the KD loss between
the student and the teacher as a function of T, (3) why Hinton et al. multiply the KD loss by T².
Models load from the run's safetensors checkpoints (kd_core.teachers.read_state_dict + create_model).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import streamlit as st

from ui import artifacts, charts
from ui import state as ui_state

T_GRID = np.round(np.concatenate([np.arange(0.5, 2.0, 0.1), np.arange(2.0, 20.01, 0.25)]), 3)
AVG_IMAGES = 512  # test images averaged for the "whole test set" curves

GLOSSARY = {
    "T": "Temperature: the teacher's scores (logits) are divided by T before the softmax. T = 1 is the normal "
         "prediction; larger T flattens it so that small probabilities of wrong classes become visible.",
    "entropy": "How spread out the probabilities are, in bits: 0 = all on one class; log2(10) ≈ 3.32 = uniform over 10 classes.",
    "kd": "KD loss (Hinton et al. 2015): T² · KL(teacher's softmax at T ‖ student's softmax at T). It is 0 when the "
          "student's tempered probabilities equal the teacher's.",
    "kl": "Kullback–Leibler divergence: how many extra nats it costs to describe the teacher's distribution with the student's.",
    "grad": "Size (L2 norm) of the gradient of the loss with respect to the student's logits: how hard one training "
            "step pushes the student on this term.",
}


# --------------------------------------------------------------------------- loading (cached)


@st.cache_resource(show_spinner="Loading the dataset…", max_entries=4)
def load_data(name: str, root: str, val_fraction: float, subset: int | None, image_size: int | None, seed: int):
    from kd_core.data import load_dataset

    return load_dataset(name, root, val_fraction=val_fraction, subset=subset, image_size=image_size, seed=seed)


@st.cache_resource(show_spinner="Loading weights…", max_entries=16)
def load_model(path: str, mtime: float, arch: str, num_classes: int, in_channels: int, image_size: int):

    from kd_core.models import create_model
    from kd_core.teachers import read_state_dict

    model = create_model(arch, num_classes, in_channels, image_size)
    model.load_state_dict(read_state_dict(path))
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@st.cache_resource(show_spinner="Running the models on the test images…", max_entries=16)
def test_logits(_model, path: str, mtime: float, data_key: tuple, _x) -> "np.ndarray":
    import torch

    with torch.no_grad():
        out = torch.cat([_model(_x[i : i + 256]).float() for i in range(0, len(_x), 256)])
    return out.numpy()


def teacher_path(store, run) -> tuple[str, str] | None:
    """(path, arch) of the teacher the run distilled from: its own, or the run/file it loaded."""
    arch = run.config.get("teacher", {}).get("arch")
    ckpts = artifacts.checkpoint_paths(store, run.id)
    for key in (("teacher", "last"), ("teacher", "best")):
        if key in ckpts:
            return ckpts[key], artifacts.checkpoint_arch(store, run.id, "teacher") or arch
    source = str(run.config.get("teacher", {}).get("source", ""))
    if source.startswith("run:"):
        try:
            other = int(source[4:])
            ck = artifacts.checkpoint_paths(store, other)
        except (ValueError, KeyError):
            return None
        for key in (("teacher", "last"), ("teacher", "best"), ("student", "best")):
            if key in ck:
                return ck[key], arch
    if source.startswith("file:") and Path(source[5:]).expanduser().is_file():
        return str(Path(source[5:]).expanduser()), arch
    return None


def usable_runs(store) -> list:
    out = []
    for r in store.list_runs(status=["completed"], limit=200):
        ckpts = artifacts.checkpoint_paths(store, r.id)
        has_student = ("student", "best") in ckpts or ("student", "last") in ckpts
        if has_student and teacher_path(store, r):
            out.append(r)
    return out


# --------------------------------------------------------------------------- maths (numpy + torch)


def softmax_t(logits: np.ndarray, t: float) -> np.ndarray:
    z = logits / t
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def entropy_bits(p: np.ndarray) -> float:
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())


def kd_over_t(student: np.ndarray, teacher: np.ndarray, temps: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For every T: KD loss (with T²), and mean per-image gradient norms d KD/d student logits with and without T².

    ``student``/``teacher``: [N, C] logits. Uses kd_core.losses.kd_loss (the one training uses) and autograd.
    """
    import torch

    from kd_core.losses import kd_loss

    s = torch.tensor(student, dtype=torch.float64)
    t = torch.tensor(teacher, dtype=torch.float64)
    n = s.shape[0]
    losses, g_with, g_without = [], [], []
    for temp in temps:
        z = s.clone().requires_grad_(True)
        loss = kd_loss(z, t, float(temp))  # mean over the batch, times T²
        (grad,) = torch.autograd.grad(loss, z)
        per_image = (grad * n).norm(dim=1)  # undo the batch mean: each image's own gradient
        losses.append(float(loss.detach()))
        g_with.append(float(per_image.mean()))
        g_without.append(float(per_image.mean()) / float(temp) ** 2)
    return np.array(losses), np.array(g_with), np.array(g_without)


@st.cache_data(show_spinner=False, max_entries=32)
def dataset_curves(student: np.ndarray, teacher: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return kd_over_t(student, teacher, T_GRID)


# --------------------------------------------------------------------------- page


def no_runs() -> None:
    """What to do first, with the default preset's size and (once measured here) duration computed, not quoted."""
    from ui.presets import default_preset, description

    preset = default_preset()
    st.info("The playground needs a **finished experiment** with a trained teacher and student. There is none yet."
            + (f"\n\nThe default preset is a good first one: {description(preset, ui_state.get_store())}." if preset else ""))
    if preset and st.button("Set up the default preset", type="primary", key="pg_preset", icon=":material/science:"):
        st.session_state["prefill_config"] = preset.config
        st.switch_page("pages/new_experiment.py")


def thumbnail(splits, x) -> np.ndarray:
    import torch.nn.functional as F

    img = splits.denormalize(x[None])  # [1, C, H, W] in [0, 1]
    scale = max(1, 168 // img.shape[-1])
    img = F.interpolate(img, scale_factor=scale, mode="nearest")[0]
    arr = img.permute(1, 2, 0).numpy()
    return arr[..., 0] if arr.shape[-1] == 1 else arr


def choose_models(store, runs):
    """The run, its test split and the teacher and student models as picked; None when they cannot be loaded."""
    c1, c2 = st.columns([3, 2])
    labels = {r.id: f"#{r.id} {r.name} (teacher {r.config.get('teacher', {}).get('arch')}, "
                    f"student {r.config.get('student', {}).get('arch')})" for r in runs}
    run_id = c1.selectbox("Teacher from run", list(labels), format_func=labels.get, key="pg_run",
                          help="Finished runs with saved checkpoints; the newest is first.")
    run = next(r for r in runs if r.id == run_id)
    cfg, ds = run.config, run.config.get("dataset", {})
    try:
        splits = load_data(ds.get("name", "mnist5k"), ds.get("root", "distillery-data/datasets"), float(ds.get("val_fraction", 0.0)),
                           ds.get("subset"), ds.get("image_size"), int(cfg.get("seed", 0)))
    except Exception as exc:  # noqa: BLE001 - DatasetUnavailable etc.
        st.error(f"Could not load the dataset {ds.get('name')!r} of this run: {exc}")
        return None
    ckpts = artifacts.checkpoint_paths(store, run.id)
    students = {label: ckpts[key] for key, label in ((("student", "best"), "distilled student (best)"),
                                                      (("student", "last"), "distilled student (last)"),
                                                      (("baseline", "best"), "baseline student, no teacher (best)")) if key in ckpts}
    student_label = c2.radio("Student", list(students), key="pg_student", horizontal=False,
                             help="The distilled student learned from this teacher; the baseline is the same network "
                                  "trained on the labels only. Compare their KD loss below.")
    tpath, tarch = teacher_path(store, run)
    shape = (splits.num_classes, splits.in_channels, splits.image_size)
    try:
        teacher = load_model(tpath, Path(tpath).stat().st_mtime, tarch, *shape)
        spath = students[student_label]
        student = load_model(spath, Path(spath).stat().st_mtime, cfg.get("student", {}).get("arch"), *shape)
    except Exception as exc:  # noqa: BLE001 - TeacherUnavailable, shape mismatch
        st.error(f"Could not load the checkpoints of run #{run.id}: {exc}")
        return None
    n_avg = min(AVG_IMAGES, len(splits.test_y))
    data_key = (ds.get("name"), ds.get("subset"), ds.get("image_size"), ds.get("val_fraction"), cfg.get("seed"), n_avg)
    t_logits = test_logits(teacher, tpath, Path(tpath).stat().st_mtime, data_key, splits.test_x[:n_avg])
    s_logits = test_logits(student, spath, Path(spath).stat().st_mtime, data_key, splits.test_x[:n_avg])
    return splits, t_logits, s_logits, student_label


def soft_targets_section(splits, t_logits, s_logits, idx: int, temp: float) -> None:
    names, label = splits.class_names, int(splits.test_y[idx])
    p_t, p_s, p_t1 = softmax_t(t_logits[idx], temp), softmax_t(s_logits[idx], temp), softmax_t(t_logits[idx], 1.0)
    wrong = [i for i in np.argsort(-p_t) if i != label]
    st.header("1 · The teacher's soft targets")
    left, right = st.columns([1, 3])
    with left:
        st.image(thumbnail(splits, splits.test_x[idx]), caption=f"true class: {names[label]}", clamp=True, width=168)
        st.caption(f"Teacher's normal prediction (T = 1): **{names[int(np.argmax(p_t1))]}** with {100 * p_t1.max():.1f} %.")
    with right:
        show_student = st.toggle("Also show the student's probabilities", value=False, key="pg_show_student")
        fig = charts.probs_figure(names, p_t, label, temperature=temp, student_probs=p_s if show_student else None)
        st.plotly_chart(fig, config=charts.plotly_config(f"playground_softmax_T{temp:g}"), key="pg_probs")
    m1, m2, m3, m4 = st.columns(4)
    m1.metric("P(true class)", f"{100 * p_t[label]:.1f} %",
              help="The teacher's probability for the correct class, at the chosen temperature. At T = 1 a good teacher puts almost everything here.")
    m2.metric(f"Runner-up: {names[wrong[0]]}", f"{100 * p_t[wrong[0]]:.2f} %",
              help="The wrong class the teacher finds most similar to this image: part of the 'dark knowledge'.")
    m3.metric("Entropy", f"{entropy_bits(p_t):.2f} bits", help="Of the teacher's soft targets at this T. " + GLOSSARY["entropy"])
    m4.metric("Entropy at T = 1", f"{entropy_bits(p_t1):.2f} bits", help="Entropy without temperature, for comparison.")
    if int(np.argmax(p_t1)) != label:
        st.warning(f"The teacher gets this one wrong: it takes this **{names[label]}** for a **{names[int(np.argmax(p_t1))]}**. "
                   "Its soft targets then teach the student the same confusion — distillation copies mistakes too.")
    st.caption(
        f"At T = 1 the teacher is nearly one-hot, like the label, so the wrong classes teach almost nothing. "
        f"Raise T: the bars of similar classes (here **{names[wrong[0]]}**, then **{names[wrong[1]]}**) grow, "
        f"and the student learns how classes relate. At very high T every class gets the same share and the information fades again."
    )


def kd_loss_section(t_logits, s_logits, idx: int, temp: float, student_label: str) -> None:
    st.header("2 · The KD loss as T changes")
    one_loss = kd_over_t(s_logits[idx : idx + 1], t_logits[idx : idx + 1], T_GRID)[0]
    avg_loss = dataset_curves(s_logits, t_logits)[0]
    now = float(np.interp(temp, T_GRID, one_loss))
    cols = st.columns([3, 1])
    with cols[0]:
        fig = charts.temperature_curve_figure(
            T_GRID, {"this image": (one_loss, charts.role_color("student"), None),
                     f"average over {len(t_logits)} test images": (avg_loss, charts.role_color("teacher"), "dash")},
            temp, title=f"KD loss between the {student_label} and the teacher", y_title="T² · KL(teacher ‖ student)")
        st.plotly_chart(fig, config=charts.plotly_config("playground_kd_vs_T"), key="pg_kd")
    with cols[1]:
        st.metric("KD loss at this T", f"{now:.4f}", help=GLOSSARY["kd"])
        st.metric("KL at this T (without T²)", f"{now / temp ** 2:.5f}", help=GLOSSARY["kl"])
    st.caption("The loss the student minimises (the 'kd' term of the recipe). Try the baseline student: it never saw the "
               "teacher, so its loss is usually higher — that gap is what distillation learned.")


def t_squared_section(t_logits, s_logits, temp: float) -> None:
    st.header("3 · Why multiply by T²?")
    _, avg_gw, avg_gwo = dataset_curves(s_logits, t_logits)
    fig = charts.temperature_curve_figure(
        T_GRID, {"with T² (what training uses)": (avg_gw, charts.role_color("student"), None),
                 "without T²": (avg_gwo, charts.role_color("baseline"), "dash")},
        temp, title="How hard the KD term pushes the student (gradient size)", y_title="‖∂ KD / ∂ student logits‖",
        log_y=True)
    st.plotly_chart(fig, config=charts.plotly_config("playground_gradient_T2"), key="pg_grad")
    g1, g2 = st.columns(2)
    g1.metric("Gradient size with T²", f"{float(np.interp(temp, T_GRID, avg_gw)):.4f}", help=GLOSSARY["grad"])
    g2.metric("Gradient size without T²", f"{float(np.interp(temp, T_GRID, avg_gwo)):.2e}", help=GLOSSARY["grad"])
    st.caption(
        "Dividing logits by T shrinks the gradient of the KL term by about 1/T² (one 1/T from the softmax, one from the "
        "smaller differences between the softened distributions). Without correction, a larger T would silently make "
        "the KD term weaker next to the cross-entropy on labels. Multiplying by T² keeps its strength roughly the "
        "same at any T (the solid line stays flat at high T), so T and the recipe weight can be tuned separately."
    )


def main() -> None:
    st.title("KD playground: what does the teacher teach?")
    st.markdown(
        "A trained teacher does not only say *which* class an image is: its probabilities for the **wrong** classes "
        "say which classes it finds similar (a 7 looks a bit like a 1, hardly like a 0). Hinton et al. called this "
        "**dark knowledge**. Knowledge distillation trains the student to copy these soft probabilities, "
        "softened by a **temperature** T so that the small ones count.",
    )
    # the playground shows T on one trained pair; the sweep shows what T does to training itself
    # (a button, not st.page_link: a link must name a page of app.py's navigation, which a page run alone lacks)
    if st.button("What does T do to the trained student? The temperature sweep (T = 1 … 16, two seeds) on the Sweeps page",
                 key="pg_sweep", icon=":material/grid_view:"):
        st.switch_page("pages/sweep.py")
    store = ui_state.get_store()
    runs = usable_runs(store)
    if not runs:
        no_runs()
        return
    chosen = choose_models(store, runs)
    if chosen is None:
        return
    splits, t_logits, s_logits, student_label = chosen
    n_avg = len(t_logits)
    c1, c2, c3 = st.columns([2, 1, 3])
    idx = c1.number_input(f"Test image (0–{n_avg - 1})", 0, n_avg - 1, st.session_state.get("pg_idx_default", 0), 1, key="pg_idx",
                          help="An image from the run's test split (never seen in training).")
    if c2.button("Random", key="pg_random", help="Pick another test image at random.", icon=":material/casino:"):
        st.session_state["pg_idx_default"] = int(np.random.default_rng().integers(n_avg))
        del st.session_state["pg_idx"]
        st.rerun()
    temp = c3.slider("Temperature T", 0.5, 20.0, 4.0, 0.5, key="pg_T", help=GLOSSARY["T"])
    soft_targets_section(splits, t_logits, s_logits, idx, temp)
    kd_loss_section(t_logits, s_logits, idx, temp, student_label)
    t_squared_section(t_logits, s_logits, temp)


ui_state.ensure_app(__file__)  # a deep link on a fresh server: hand over to app.py (navigation, page config)
main()
