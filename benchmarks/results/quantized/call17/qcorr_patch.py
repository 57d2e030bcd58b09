"""Experiment only (applied to the device's copy, not main): a frozen rank-r correction of each adapted 4-bit
layer's rounding error kept in its base (``Q x + B_c (A_c x)``, ``B_c A_c = SVD_r(W - Q)``, with LoftQ's alternation
re-quantising ``Q = q(W - B_c A_c)`` T - 1 times), under OT_QCORR=r (and OT_QCORR_T=T), for any method; the rotation
methods then rotate the input of ``Q + B_c A_c``. Run from the repository root: python3 .../qcorr_patch.py"""
import pathlib

q = pathlib.Path("src/orthotune/layer/quantized.py")
s = q.read_text()
old = "        return bnb.matmul_4bit(z, module.weight, quant_state=module.weight.quant_state).to(x.dtype)\n"
new = ("        out = bnb.matmul_4bit(z, module.weight, quant_state=module.weight.quant_state)\n"
       "        corr = getattr(module, '_qcorr', None)\n"
       "        if corr is not None:\n"
       "            out = out + torch.nn.functional.linear(torch.nn.functional.linear(z, corr[0]), corr[1])\n"
       "        return out.to(x.dtype)\n")
assert s.count(old) == 1
q.write_text(s.replace(old, new))

c = pathlib.Path("src/orthotune/recipes/causal_lm.py")
s = c.read_text()
old = '        if self.model_settings.loftq:\n            loftq_init(model, self.path, iterations=self.model_settings.loftq_iterations)\n'
new = old + '''        import os
        if os.environ.get("OT_QCORR"):
            from ..layer import quantized
            from ..methods.pissa import principal_factors
            from ..model.loftq import _Weights, _key
            r, T = int(os.environ["OT_QCORR"]), int(os.environ.get("OT_QCORR_T", "1"))
            src = _Weights(self.path)
            names = src.names()
            prefix = getattr(getattr(model, "base_model", None), "base_model_prefix", "") or ""
            done = 0
            for name, layer in model.adapter_layers():
                base = layer.base_layer
                if not quantized.is_4bit(base):
                    continue
                W = src.get(_key(name, names, prefix)).to(device=base.weight.device, dtype=torch.float32)
                A, B = principal_factors(W - quantized.dequantize(base).float(), r, 1.0)
                for _ in range(T - 1):
                    quantized.requantize(base, W - B @ A)
                    A, B = principal_factors(W - quantized.dequantize(base).float(), r, 1.0)
                base._qcorr = (A.to(base.compute_dtype).contiguous(), B.to(base.compute_dtype).contiguous())
                done += 1
            print(f"OT_QCORR: rank-{r} correction (T={T}) on {done} layers", flush=True)
'''
assert s.count(old) == 1
c.write_text(s.replace(old, new))
