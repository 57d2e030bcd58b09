"""Run 8, call 4: memory left allocated after a step (graphed or eager) and its model are dropped (see probes.md)."""
import gc, sys, torch
sys.path.insert(0, ".carry/gpu/src")
import orthotune
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM
dev = "cuda"
def alloc():
    gc.collect(); torch.cuda.synchronize(); return torch.cuda.memory_allocated()
def llama():
    cfg = LlamaConfig(vocab_size=1000, hidden_size=512, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8)
    with torch.device(dev): return LlamaForCausalLM(cfg)
def batch():
    ids = torch.randint(0, 1000, (4, 256), device=dev); return dict(input_ids=ids, labels=ids, use_cache=False)
def run(name, make, steps=4, **kw):
    b0 = alloc()
    model, loss_fn = make()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, capturable=True)
    step = orthotune.GraphedStep(model, opt, loss_fn, warmup_steps=1, **kw)
    for _ in range(steps): step(batch())
    del model, opt, step, loss_fn
    print(f"leak {name}: {(alloc() - b0) / 2**20:.2f} MiB", flush=True)
mlp = lambda: (nn.Sequential(nn.Linear(512, 2048), nn.GELU(), nn.Linear(2048, 512)).to(dev), lambda m, b: m(b["x"]).square().mean())
def run_mlp(name):
    b0 = alloc()
    m, f = mlp(); opt = torch.optim.AdamW(m.parameters(), capturable=True)
    step = orthotune.GraphedStep(m, opt, f, warmup_steps=1)
    x = torch.randn(4096, 512, device=dev)
    for _ in range(4): step(dict(x=x))
    del m, f, opt, step, x
    print(f"leak {name}: {(alloc() - b0) / 2**20:.2f} MiB", flush=True)
run_mlp("mlp GraphedStep")
run_mlp("mlp GraphedStep again")
def full():
    m = llama(); return m, orthotune.graphs.model_loss
run("llama full FT", full)
run("llama full FT again", full)
def lora():
    m = llama()
    for p in m.parameters(): p.requires_grad_(False)
    return orthotune.get_model(m, orthotune.LoRAConfig(target_modules=["q_proj", "v_proj"], r=8)), orthotune.graphs.model_loss
run("llama orthotune LoRA", lora)
def lora_eager():
    b0 = alloc()
    m, f = lora()
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], capturable=True)
    step = orthotune.GraphedStep(m, opt, f, enabled=False)
    for _ in range(4): step(batch())
    del m, f, opt, step
    print(f"leak llama orthotune LoRA eager: {(alloc() - b0) / 2**20:.2f} MiB", flush=True)
lora_eager()
b0 = alloc()  # plain torch.cuda.graph, no orthotune
m = llama(); opt = torch.optim.AdamW(m.parameters(), capturable=True); bb = batch()
s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
with torch.cuda.stream(s):
    opt.zero_grad(set_to_none=True); m(**bb).loss.backward(); opt.step()
torch.cuda.current_stream().wait_stream(s)
opt.zero_grad(set_to_none=True)
g = torch.cuda.CUDAGraph()
with torch.cuda.graph(g):
    l = m(**bb).loss; l.backward(); opt.step()
g.replay()
del m, opt, bb, s, g, l
print(f"leak plain torch.cuda.graph llama: {(alloc() - b0) / 2**20:.2f} MiB", flush=True)
