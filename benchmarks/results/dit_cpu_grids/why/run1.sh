cd /work/main && . /work/venv/bin/activate && export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONPATH=src
T="target_modules: [attn.qkv, attn.proj, mlp.fc1, mlp.fc2]"
run() {  # name recipe backbone method adapter lr
  python -m orthotune finetune --config recipes/$2.yaml --quiet --device cpu --output-dir /tmp/rr/$1 --seed 0 --lr $6 \
    --set model.checkpoint=pretrained:$3 --set method=$4 --set "adapter=$5" --set train.save_every=0 --set train.eval_every=0 > /tmp/rr/$1.log 2>&1
  python3 -c "import json; r=json.load(open('/tmp/rr/$1/results.json')); print('$1', r['final'])"
}
run dit-lora dit_digits dit-fmnist-small lora "{$T, r: 8, lora_alpha: 16}" 1.8e-2
run dit-loco dit_digits dit-fmnist-small loco "{$T, rank: 5, chain_length: 2, mode: exact}" 2.7e-2
run dit-full dit_digits dit-fmnist-small full "{}" 8.1e-3
run vit-lora vit_digits vit-fmnist-small lora "{$T, r: 8, lora_alpha: 16}" 6e-3
run vit-full vit_digits vit-fmnist-small full "{}" 2.7e-3
run vit-loco vit_digits vit-fmnist-small loco "{$T, rank: 5, chain_length: 2, mode: exact}" 2.7e-2
