"""The package surface and the demo."""

import io

import fgattn_cute as fg
from fgattn_cute import demo


def test_exports():
    assert fg.__version__ == "0.1.0"
    assert fg.KeyIndex.__name__ == "KeyIndex"
    assert fg.PackedKeyIndex.__name__ == "PackedKeyIndex"
    assert callable(fg.sparse_attention)
    assert callable(fg.reference.sparse_attention)
    assert fg.predict.__name__ == "fgattn_cute.predict"
    assert set(fg.__all__) >= {"KeyIndex", "PackedKeyIndex", "sparse_attention", "reference",
                               "predict", "__version__"}


def test_demo_runs_and_matches():
    text = io.StringIO()
    err, density, ok = demo.main(H=2, seqlen=300, out=text)
    assert ok and err < 3e-2
    assert 0.25 < density < 0.35
    assert "max |sparse_attention - dense masked attention|" in text.getvalue()
    assert "density" in text.getvalue()
