"""The evaluation protocol and the one training loop."""
import pytest
import torch

from ddkit.engine import make_generator
from ddkit.evaluation import EvalProtocol, Report, Row, evaluate, train_model
from ddkit.evaluation.train import soft_label_loss
from ddkit.models import create_model
from ddkit.synthetic import SyntheticSet


def small_net(real):
    return create_model("convnet", channels=real.channels, num_classes=real.num_classes, image_size=real.image_size,
                        width=16)


def test_train_model_is_deterministic_and_learns(digits):
    x, y = digits.train_images[:200], digits.train_labels[:200]
    nets = []
    for _ in range(2):
        torch.manual_seed(0)
        net = small_net(digits)
        train_model(net, x, y, epochs=30, lr=0.01, generator=make_generator(0), batch_size=64)
        nets.append(net)
    for a, b in zip(nets[0].parameters(), nets[1].parameters()):
        assert torch.equal(a, b)
    from ddkit.evaluation import accuracy

    assert accuracy(nets[0], digits.test_images, digits.test_labels) > 70.0


def test_soft_label_losses_match_hard_ce_on_one_hot():
    logits = torch.randn(5, 4)
    y = torch.tensor([0, 1, 2, 3, 0])
    onehot = torch.nn.functional.one_hot(y, 4).float()
    ce = torch.nn.functional.cross_entropy(logits, y)
    assert soft_label_loss("soft_ce")(logits, onehot) == pytest.approx(float(ce), rel=1e-5)
    assert soft_label_loss("kl")(logits, onehot) == pytest.approx(float(ce), rel=1e-4)


def test_evaluate_uses_learned_lr_and_reports(digits):
    syn = SyntheticSet.from_real(digits, 1, make_generator(0))
    syn.extras["lr"] = torch.nn.Parameter(torch.tensor([0.005]))
    protocol = EvalProtocol(runs=2, epochs=2, model_overrides={"width": 8})
    report = evaluate(syn, digits, protocol, seed=0)
    assert report.protocol["lr_used"] == pytest.approx(0.005)
    summary = report.summary()["convnet"]
    assert len(summary["accs"]) == 2
    # same seed -> same numbers (fresh models are seeded from named streams)
    again = evaluate(syn, digits, protocol, seed=0)
    assert again.summary()["convnet"]["accs"] == summary["accs"]
    js = report.to_json()
    assert js["dataset"] == "digits" and js["ipc"] == 1
    assert "convnet" in report.to_markdown() and report.to_csv().count("\n") == 3


def test_soft_label_sets_train(digits):
    syn = SyntheticSet.from_real(digits, 1, make_generator(0), soft_labels=True)
    report = evaluate(syn, digits, EvalProtocol(runs=1, epochs=2, model_overrides={"width": 8}), seed=0)
    assert 0.0 <= report.summary()["convnet"]["mean"] <= 100.0


def test_report_merge():
    r1 = Report([Row("a", "d", 1, "m", 0, 0, 50.0, 1.0)])
    r2 = Report([Row("a", "d", 1, "m", 1, 0, 70.0, 1.0)])
    s = Report.merge([r1, r2]).summary()["m"]
    assert s["mean"] == pytest.approx(60.0) and s["std"] == pytest.approx(10.0)
