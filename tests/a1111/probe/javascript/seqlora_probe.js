// Test-only: with ?seqlora_shot=tab in the URL, open the SeqLoRA tab once the UI has loaded
// (headless Chromium takes the screenshot without clicking anything).
/* global onUiLoaded, gradioApp */
onUiLoaded(function() {
    var shot = new URLSearchParams(window.location.search).get('seqlora_shot');
    if (shot !== 'tab') return;
    var buttons = gradioApp().querySelectorAll('#tabs > .tab-nav > button');
    buttons.forEach(function(b) {
        if (b.textContent.trim() === 'SeqLoRA') b.click();
    });
});
