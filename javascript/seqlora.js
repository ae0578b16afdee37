// SeqLoRA extension for Automatic1111 / Forge.
// 1. The tab's Train/Resume buttons: a task id and the host's progress polling (like its Train tab).
// 2. The accordion's concept picker: one row per concept (tick box, strength slider), written into the
//    accordion's "Concepts" text field as "name:strength, !off:strength" (the value the API and the
//    infotext carry), and re-read from it when that field changes (typing, PNG info, send to txt2img).

/* global gradioApp, randomId, requestProgress, onUiUpdate, updateInput */

function seqlora_start_training() {
    var result = gradioApp().getElementById('seqlora_train_result');
    var text = gradioApp().getElementById('seqlora_train_progress');
    if (result) result.innerHTML = '';
    var id = randomId();
    requestProgress(id, result, null, function() {}, function(progress) {
        if (text && progress.textinfo) text.innerHTML = progress.textinfo;
    });
    var res = Array.from(arguments);
    res[0] = id;
    return res;
}

function seqloraParse(text) {
    var out = [];
    (text || '').replace(/\n/g, ',').split(',').forEach(function(raw) {
        var item = raw.trim();
        if (!item) return;
        var on = item[0] !== '!';
        item = item.replace(/^!+/, '').trim();
        var cut = item.lastIndexOf(':');
        var name = cut >= 0 ? item.slice(0, cut).trim() : item;
        var s = cut >= 0 ? parseFloat(item.slice(cut + 1)) : 1.0;
        if (name) out.push({name: name, strength: isNaN(s) ? 1.0 : s, on: on});
    });
    return out;
}

function seqloraFormat(items) {
    return items.map(function(x) {
        return (x.on ? '' : '!') + x.name + ':' + (+x.strength.toFixed(3));
    }).join(', ');
}

function seqloraTextarea(picker) {
    var where = picker.id.replace(/_picker$/, '');
    return gradioApp().querySelector('#' + where + '_concepts textarea');
}

function seqloraRender(pickerRoot) {
    var box = pickerRoot.querySelector('.seqlora-picker[data-concepts]');
    if (!box) return;
    var textarea = seqloraTextarea(pickerRoot);
    if (!textarea) return;
    var data = box.getAttribute('data-concepts');
    if (box.dataset.rendered === data && box.dataset.synced === textarea.value) return;
    var concepts = JSON.parse(data || '[]');
    var current = {};
    seqloraParse(textarea.value).forEach(function(x) {
        current[x.name] = x;
    });
    var list = document.createElement('div');
    var rows = [];
    concepts.forEach(function(c) {
        var sel = current[c.name] || {name: c.name, strength: 1.0, on: false};
        var row = document.createElement('label');
        row.className = 'seqlora-row';
        row.title = 'triggers: ' + (c.triggers || []).join(', ');
        var tick = document.createElement('input');
        tick.type = 'checkbox';
        tick.checked = sel.on;
        tick.defaultChecked = sel.on;
        var name = document.createElement('span');
        name.className = 'seqlora-name';
        name.textContent = c.name;
        var slider = document.createElement('input');
        slider.type = 'range';
        slider.min = -1;
        slider.max = 2;
        slider.step = 0.05;
        slider.value = sel.strength;
        var value = document.createElement('span');
        value.className = 'seqlora-value';
        value.textContent = (+sel.strength).toFixed(2);
        var trig = document.createElement('span');
        trig.className = 'seqlora-muted';
        trig.textContent = (c.triggers || []).join(', ');
        row.append(tick, name, slider, value, trig);
        list.appendChild(row);
        rows.push({name: c.name, tick: tick, slider: slider, value: value});
    });
    var write = function() {
        var items = rows.map(function(r) {
            return {name: r.name, strength: parseFloat(r.slider.value), on: r.tick.checked};
        });
        // keep listed names the bank does not have (the server reports them), after the bank's own
        seqloraParse(textarea.value).forEach(function(x) {
            if (!rows.some(function(r) { return r.name === x.name; })) items.push(x);
        });
        textarea.value = seqloraFormat(items);
        box.dataset.synced = textarea.value;
        updateInput(textarea);
    };
    rows.forEach(function(r) {
        r.tick.addEventListener('change', write);
        r.slider.addEventListener('input', function() {
            r.value.textContent = parseFloat(r.slider.value).toFixed(2);
        });
        r.slider.addEventListener('change', write);
    });
    box.innerHTML = '';
    box.appendChild(list);
    box.dataset.rendered = data;
    box.dataset.synced = textarea.value;
}

// the dropdown can show another bank than the picker was built for (saved UI defaults, a pasted infotext):
// then ask the extension's API for that bank's concepts
var seqloraFetching = {};

function seqloraFollowBank(pickerRoot) {
    var where = pickerRoot.id.replace(/_picker$/, '');
    var input = gradioApp().querySelector('#' + where + '_bank input');
    var box = pickerRoot.querySelector('.seqlora-picker');
    if (!input || !box || !input.value || box.getAttribute('data-bank') === input.value) return;
    var bank = input.value;
    if (seqloraFetching[where] === bank) return;
    seqloraFetching[where] = bank;
    fetch('./seqlora/v1/bank?name=' + encodeURIComponent(bank)).then(function(r) {
        return r.json();
    }).then(function(info) {
        seqloraFetching[where] = null;
        if (!info || !info.concepts || input.value !== bank) return;
        box.setAttribute('data-bank', bank);
        box.setAttribute('data-concepts', JSON.stringify(info.concepts.map(function(c) {
            return {name: c.name, triggers: c.triggers};
        })));
        seqloraRender(pickerRoot);
    }).catch(function() {
        seqloraFetching[where] = null;
    });
}

onUiUpdate(function() {
    ['seqlora_txt2img_picker', 'seqlora_img2img_picker'].forEach(function(id) {
        var root = gradioApp().getElementById(id);
        if (!root) return;
        seqloraFollowBank(root);
        seqloraRender(root);
    });
});
