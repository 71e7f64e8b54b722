"""MagNet's published accuracies on adversarial examples (Meng & Chen 2017, Tables 3 and 4):
(no defense, with defense), in percent."""

PAPER = {
    "mnist": {
        "fgsm_eps0.005": (96.8, 100.0), "fgsm_eps0.01": (91.1, 100.0),
        "iterative_linf_eps0.005": (95.2, 100.0), "iterative_linf_eps0.01": (72.0, 100.0),
        "iterative_l2_eps0.5": (86.7, 99.2), "iterative_l2_eps1": (76.6, 100.0),
        "deepfool": (19.1, 99.4),
        "carlini_l2": (0.0, 99.5), "carlini_linf": (0.0, 99.8), "carlini_l0": (0.0, 92.0),
    },
    "cifar10": {
        "fgsm_eps0.025": (46.0, 99.9), "fgsm_eps0.05": (40.5, 100.0),
        "iterative_linf_eps0.01": (28.6, 96.0), "iterative_linf_eps0.025": (11.1, 99.9),
        "iterative_l2_eps0.25": (18.4, 76.3), "iterative_l2_eps0.5": (6.6, 83.3),
        "deepfool": (4.5, 93.4),
        "carlini_l2": (0.0, 93.7), "carlini_linf": (0.0, 83.0), "carlini_l0": (0.0, 77.5),
    },
}

# Table 5 (CIFAR-10, eight diverse autoencoders, Carlini L2): accuracy with the defense, in percent.
PAPER_GRAYBOX = {"cifar10": {"diagonal": "0 %", "off_diagonal": "90.5–94.1 %", "random": "80.3–81.7 %"}}
