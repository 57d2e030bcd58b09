cd /work/main && . /work/venv/bin/activate && export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONPATH=src
T="target_modules: [attn.qkv, attn.proj, mlp.fc1, mlp.fc2]"
run() {  # name method adapter lr seed
  python -m orthotune finetune --config recipes/dit_digits.yaml --quiet --device cpu --output-dir /tmp/rr/$1 --seed $5 --lr $4 \
    --set model.checkpoint=pretrained:dit-fmnist-small --set method=$2 --set "adapter=$3" --set train.save_every=0 --set train.eval_every=0 > /tmp/rr/$1.log 2>&1
  python3 -c "import json; r=json.load(open('/tmp/rr/$1/results.json')); print('$1', r['final'], r['parameters']['trainable'])"
}
for s in 0 1 2; do
run dit-loco-fl-$s loco "{$T, rank: 5, chain_length: 2, mode: exact, modules_to_save: [y_embedder, final_linear]}" 2.7e-2 $s
run dit-lora-fl-$s lora "{$T, r: 8, lora_alpha: 16, modules_to_save: [y_embedder, final_linear]}" 1.8e-2 $s
done
for s in 1 2; do
run dit-loco-$s loco "{$T, rank: 5, chain_length: 2, mode: exact}" 2.7e-2 $s
run dit-lora-$s lora "{$T, r: 8, lora_alpha: 16}" 1.8e-2 $s
done
