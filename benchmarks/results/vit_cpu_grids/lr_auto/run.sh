cd /work/main && . /work/venv/bin/activate && export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONPATH=src
for spec in "loco|{target_modules: [attn.qkv, attn.proj, mlp.fc1, mlp.fc2], rank: 5, chain_length: 2, mode: exact}" \
            "lora|{target_modules: [attn.qkv, attn.proj, mlp.fc1, mlp.fc2], r: 8, lora_alpha: 16}" \
            "loft|{target_modules: [attn.qkv, attn.proj, mlp.fc1, mlp.fc2], support: gradient, transform: cayley, r: 56}" \
            "oft|{target_modules: [attn.qkv, attn.proj, mlp.fc1, mlp.fc2], r: 0, oft_block_size: 32}"; do
  m=${spec%%|*}; a=${spec#*|}
  for seed in 0 1 2; do
    python -m orthotune finetune --config recipes/vit_digits.yaml --quiet --device cpu --output-dir /tmp/auto/$m-$seed --seed $seed --lr auto \
      --set model.checkpoint=pretrained:vit-fmnist-small --set method=$m --set "adapter=$a" --set train.save_every=0 --set train.eval_every=0 > /tmp/auto/$m-$seed.log 2>&1
    python3 -c "
import json; r=json.load(open('/tmp/auto/$m-$seed/results.json')); s=r['lr_search']
print('$m', $seed, 'chosen', s['chosen'], 'factors', [round(t['factor'],3) for t in s['trials']], 'test', r['final']['accuracy'])"
  done
done
