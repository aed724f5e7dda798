"""The formats the kernel tests hold every implementation to (shared by the test modules)."""

from __future__ import annotations

import dataclasses

from hwport import formats as F

CFP8T = dataclasses.replace(F.cfp8("143", 7), name="cfp8t", subnormal_exponent="bias")
CFP8FTZ = dataclasses.replace(F.cfp8("143", 7), name="cfp8ftz", subnormals=False)

# names resolve through the registry; the two custom ones are FloatFormat objects
FORMATS: dict[str, F.FloatFormat] = {
    **{name: F.get(name)
       for name in ("bf16", "fp16", "e4m3fn", "e5m2", "tf32", "cfp8_143_b0", "cfp8_143_b7",
                    "cfp8_152_b15", "cfp8_152_b63", "cfp16_shp_b15")},
    "cfp8t": CFP8T,
    "cfp8ftz": CFP8FTZ,
}
